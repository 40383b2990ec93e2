"""Cross-section checks of a pipeline config, all reported at once before anything starts.

Each section validates itself (shared/config.py); this catches sections that disagree with each other,
e.g. a trainer pointed at another model than the one served, or a max_length too short for the prompt
template. Reads only JSON/tokenizer files: no torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shared.config import Config, ConfigError
from shared.prompting import load_template

log = logging.getLogger(__name__)


def _template_tokens(model_dir: Path, prompt: str) -> int | None:
    """Token count of the rendered template with the model's own tokenizer (fast tokenizers only)."""
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        return None
    from tokenizers import Tokenizer

    return len(Tokenizer.from_file(str(tok_file)).encode(prompt).ids)


def _heldout_problems(cfg: Config) -> list[str]:
    """eval.heldout_types must be IFEval ids and leave the generator something to draw; say what it cannot hold out."""
    from eval.constraints import GENERATED_IDS, check_heldout_types

    types = cfg.eval.heldout_types
    problems = [f"eval.heldout_types: {p}" for p in check_heldout_types(types)]
    never = [t for t in types if t not in GENERATED_IDS]
    if never and not problems:
        log.info("eval.heldout_types %s: the constraint generator never draws these anyway; they are scored on "
                 "their own but hold nothing back from training", never)
    if types and "file" in cfg.pairs.sources:
        log.warning("pairs.sources has 'file': constraints given in %s are used as written, held-out types "
                    "included; only generated constraints leave eval.heldout_types out", cfg.pairs.input_file)
    if cfg.pipeline.guards.enabled and cfg.eval.limit is not None and cfg.eval.limit < 100:
        log.info("eval.limit=%d: the promotion guards compare point estimates over few prompts; expect noise to "
                 "refuse some rounds (pipeline.guards.* trade that off)", cfg.eval.limit)
    return problems


def validate_pipeline(cfg: Config, model_dir: Path | None) -> None:
    problems: list[str] = []
    if cfg.train.base_model or cfg.merge.base_model:
        problems.append("train.base_model / merge.base_model must be unset in a pipeline run: each round trains and "
                        "merges into the model it served (model.base in round 0, then the previous merge)")
    if cfg.train.pairs_dir or cfg.train.output_dir or cfg.merge.adapter_dir or cfg.merge.output_dir:
        problems.append("train.pairs_dir/output_dir and merge.adapter_dir/output_dir must be unset in a pipeline run: "
                        "the round layout (runs/<name>/round-<k>/) decides them")
    if cfg.train.round or cfg.pairs.round:
        problems.append("train.round / pairs.round must be 0 (unset) in a pipeline run: the loop sets them per round")
    if cfg.pairs.servers:
        problems.append("pairs.servers must be empty in a pipeline run: the pipeline starts its own gen_server "
                        "per round (set server.* instead; server.replicas for several)")
    if cfg.server.backend != "embedded" and cfg.server.replicas != 1 and cfg.server.placement == "local":
        from gen_server.process import gpus_per_replica, replica_devices, visible_gpus

        try:  # enough GPUs for every replica's tensor x data parallel group
            replica_devices(cfg.server.replicas, gpus_per_replica(cfg.server), visible_gpus())
        except ValueError as e:
            problems.append(str(e))
    if cfg.cost.budget_usd is not None and cfg.cost.gpu_usd_per_hour == 0:
        problems.append("cost.budget_usd is set but cost.gpu_usd_per_hour is 0, so the budget can never be reached: "
                        "set the machine's price")
    if cfg.server.backend == "vllm" and cfg.train.backend == "peft" and cfg.train.load_in_4bit is False:
        log.info("serving with vLLM but training 16-bit PEFT: fine, but check trainer.plan for memory")
    problems += _heldout_problems(cfg)
    from pair_builder.settings import check_config as check_pairs_config

    try:  # the pairs settings, files included, before any server starts
        check_pairs_config(cfg)
    except ConfigError as e:
        problems += [p for p in e.problems if not p.startswith("pairs.servers")]
    try:
        tpl = load_template(cfg.model.template)
    except (OSError, ValueError) as e:
        raise ConfigError(list(dict.fromkeys([*problems, f"model.template: {e}"])), "pipeline config") from None
    if model_dir is not None:
        from gen_server.models import check_model_dir

        dummy = "--load-format=dummy" in cfg.server.extra_args or "dummy" in cfg.server.extra_args
        bad = check_model_dir(model_dir, max_model_len=cfg.server.max_model_len, need_weights=not dummy)
        if bad:  # before any server starts: the rest of the checks read this dir too
            raise ConfigError(list(dict.fromkeys([*problems, *(f"model.base: {b}" for b in bad)])), "pipeline config")
        n = _template_tokens(model_dir, tpl.render("x " * 40))
        if n is not None:
            need_pairs = n + cfg.pairs.max_tokens
            if need_pairs > cfg.train.max_length:
                problems.append(f"train.max_length={cfg.train.max_length} is shorter than the prompt template "
                                f"(~{n} tokens with a short instruction) + pairs.max_tokens={cfg.pairs.max_tokens} = "
                                f"{need_pairs}: raise train.max_length or shorten the template/max_tokens")
            if cfg.server.max_model_len is not None:
                for name, mt in (("eval.max_tokens", cfg.eval.max_tokens), ("pairs.max_tokens", cfg.pairs.max_tokens)):
                    if n + mt > cfg.server.max_model_len:
                        problems.append(f"server.max_model_len={cfg.server.max_model_len} < template (~{n} tokens) + "
                                        f"{name}={mt}: raise server.max_model_len or lower {name}")
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)), "pipeline config")  # a problem two checks found: once
