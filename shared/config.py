"""Typed configuration: one YAML file plus ``a.b=c`` command-line overrides, validated all at once.

Every stage reads the same :class:`Config`; each section is a pydantic model with help text and checks, and
unknown keys are errors (a typo must not silently fall back to a default). :func:`load_config` collects
every problem - unreadable YAML, malformed overrides, wrong types, unknown keys - and raises one
:class:`ConfigError` listing them all, before any expensive work starts.

    cfg = load_config("configs/demo-cpu.yaml", ["server.port=8123", "cost.gpu_usd_per_hour=1.74"])
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.atomic import atomic_write_text


class ConfigError(ValueError):
    """The config is wrong; the message lists every problem and how to fix it."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("demo", description="Run name: outputs go to <root>/<name>/round-<k>/.")
    root: Path = Field(Path("runs"), description="Directory that holds all runs.")

    @field_validator("name")
    @classmethod
    def _name_is_a_dir_name(cls, v: str) -> str:
        if not v or "/" in v or v in {".", ".."}:
            raise ValueError("must be a plain directory name (no '/')")
        return v


class ServerConfig(Section):
    backend: Literal["auto", "embedded", "vllm"] = Field(
        "auto", description="auto: vllm when CUDA and vllm are present, else the embedded CPU server."
    )
    model: str = Field(
        "smollm2-135m", description="Model directory, or a packaged model name (see gen_server.models)."
    )
    host: str = Field("127.0.0.1", description="Bind address; keep loopback unless the API key is set.")
    port: int = Field(8000, ge=1, le=65535, description="Port the server listens on.")
    api_key: str | None = Field(None, description="Bearer key the server requires; env GEN_SERVER_API_KEY.")
    served_model_name: str | None = Field(None, description="Name clients send as `model`; default: dir name.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights and activations. auto: the backend's choice (embedded: float32; vLLM: "
        "bfloat16 for a bfloat16 checkpoint, float16 for a float32 one); float32 serves a float32 merge exactly.")
    max_model_len: int | None = Field(None, ge=16, description="Context length; lower saves KV-cache memory.")
    seed: int = Field(0, description="Sampling seed of requests that give none.")
    # embedded only
    max_batch_size: int = Field(16, ge=1, description="Embedded: sequences decoded together; higher = more throughput, more RAM.")
    # vllm only
    quantization: Literal["none", "fp8"] = Field("none", description="vLLM: fp8 = ~1.2x throughput, half the weight memory.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="vLLM: share of GPU memory for weights "
                                          "and KV cache.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs one model is split over (a model too big "
                                      "for one GPU).")
    data_parallel_size: int = Field(1, ge=1, description="vLLM: model replicas in one server (throughput).")
    enable_prefix_caching: bool = Field(True, description="vLLM: reuse the shared few-shot prefix across requests.")
    extra_args: list[str] = Field(default_factory=list, description="Passed to `vllm serve` verbatim.")
    health_timeout_s: float = Field(900.0, gt=0, description="How long to wait for /health after start.")
    replicas: int | Literal["auto"] = Field(
        1, description="Pipeline: generation servers per round, on this node: each vLLM replica pinned to its own "
        "GPU(s) (tensor_parallel_size x data_parallel_size each); auto = as many as the visible GPUs hold. Pair building "
        "and the eval spread over all of them (one lost mid-round is dropped; the others finish its work). Not an "
        "option of one gen_server. placement=ray: replicas on the cluster; auto = one per unit of ray_resource "
        "there (per tensor_parallel_size x data_parallel_size GPUs when ray_resource is null).")
    placement: Literal["local", "ray"] = Field(
        "local", description="Pipeline: where each round's servers run. local: on this node. ray: one Ray actor per "
        "replica on the cluster at ray_address (gen_server.cluster), bound to its node's IP behind the API key; "
        "the model dir must be readable at the same path on every node (shared storage).")
    ray_address: str | None = Field(
        None, description="placement=ray: the cluster to join (the head's GCS, host:6379); None = RAY_ADDRESS, else "
        "the cluster started on this node (`ray start --head`).")
    ray_resource: str | None = Field(
        "gen_server", description="placement=ray: Ray custom resource each replica takes one of (cluster.yaml gives "
        "each GPU worker one), besides tensor_parallel_size x data_parallel_size GPUs for vLLM; null = GPUs alone.")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @field_validator("replicas")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return _count_or_auto(v, "one per GPU")


class ClientConfig(Section):
    timeout_s: float = Field(600.0, gt=0, description="Per-request timeout; long generations need minutes on CPU.")
    max_retries: int = Field(6, ge=0, description="Retries on connection errors, 408/409/429 and 5xx (exp. backoff + jitter).")
    stall_timeout_s: float = Field(600.0, gt=0, description="Eval and pair building stop with an error naming the "
                                   "server when no response has arrived for this long while requests are in flight "
                                   "(a stalled or dead server), instead of retrying each request max_retries times.")


def _count_or_auto(v: Any, auto_means: str) -> Any:
    """A field's ``int | "auto"`` value, refused (with what ``auto`` would do) when the int is below 1."""
    if v != "auto" and v < 1:
        raise ValueError(f"must be a count >= 1 or 'auto' ({auto_means}), got {v}")
    return v


class CostConfig(Section):
    gpu_usd_per_hour: float = Field(0.0, ge=0, description="Price of the machine (e.g. 1.74 for an A100 SXM 80GB).")
    budget_usd: float | None = Field(None, gt=0, description="Stop cleanly once the ledger reaches this.")
    gpu: Literal["h200", "h100-80gb", "a100-80gb"] | None = Field(
        None, description="The card the run is planned for (`python -m pipeline plan`; `pipeline run` plans first "
        "and refuses a run that cannot fit it); null = no GPU checks (CPU runs).")


class ModelConfig(Section):
    base: str = Field("smollm2-135m", description="The round-0 model: a 16-bit HF dir or a packaged model name.")
    allow_instruct: bool = Field(
        False, description="Start from a model eval.base_check calls INSTRUCT (the packaged demo model is one)."
    )
    template: Path | None = Field(None, description="Base-model prompt template; default constitution/base_template.yaml.")


# IFEval instruction ids pair building never draws (eval.heldout_types): one each of format, case, length,
# keywords and start/end, all kinds the constraint generator can draw, so leaving them out is a real hold-out.
DEFAULT_HELDOUT_TYPES = [
    "detectable_format:title",
    "change_case:english_capital",
    "length_constraints:number_sentences",
    "keywords:frequency",
    "startend:quotation",
]


class EvalConfig(Section):
    suite: str = Field("own", description="ifeval (541 prompts, packaged) | own (generated, held-out split) | hub[:repo] (online) | path/to/suite.jsonl")
    limit: int | None = Field(None, ge=1, description="Score only the first N prompts (quick checks).")
    prompt_style: Literal["base", "chat"] = Field("base", description="base: few-shot template via /v1/completions.")
    max_tokens: int = Field(512, ge=1, description="Longer answers cost time; too short truncates and fails length checks.")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy: the same model gives the same score.")
    concurrency: int = Field(16, ge=1, description="Requests in flight; vLLM wants hundreds, the CPU server ~batch size.")
    prompts_per_request: int = Field(8, ge=1, description="Base-style prompts per /v1/completions request (a list "
                                     "prompt): vLLM 0.71x -> 1.0x of offline throughput at 8; 1 suits the CPU "
                                     "server (a batch holds its slots until its longest answer ends). Chat: 1.")
    gate_metric: Literal["prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose",
                         "prompt_strict_clean", "prompt_loose_clean", "instruction_strict_clean",
                         "instruction_loose_clean"] = Field(
        "prompt_loose", description="The IFEval metric that decides promotion, --gate and eval.target. A *_clean "
        "metric counts only answers that finished without looping or restating the prompt "
        "(eval.report.CLEAN_METRICS): for a base model whose loops pass length instructions, and whose restated "
        "requests pass format instructions, by accident.")
    target: float = Field(0.95, ge=0.0, le=1.0, description="The plan's success rate: stop when reached.")
    heldout_types: list[str] = Field(
        default_factory=lambda: list(DEFAULT_HELDOUT_TYPES),
        description="IFEval instruction ids pair building never draws; every eval scores them on their own, so a "
        "rise there is teaching that generalises, not habits. More ids = a steadier held-out score but fewer "
        "kinds of instruction to train on; [] = none held out.")
    long_answer_words: int = Field(300, ge=1, description="Degeneration: share of answers longer than this (words) "
                                   "among prompts with no length_constraints:* instruction.")

    @field_validator("heldout_types")
    @classmethod
    def _heldout_ids(cls, v: list[str]) -> list[str]:
        bad = [i for i in v if i.count(":") != 1 or not all(i.split(":"))]
        if bad:
            raise ValueError(f"not IFEval instruction ids (category:name): {bad}")
        dup = sorted({i for i in v if v.count(i) > 1})
        if dup:
            raise ValueError(f"listed twice: {dup}")
        return v


SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# TRL 1.15's DPOConfig.loss_type values
LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


class TrainConfig(Section):
    """LoRA training of one round (``python -m trainer.dpo`` or ``trainer.sft``, ``method``); every path defaults
    into the run dir."""

    round: int = Field(0, ge=0, description="Round k: pairs from round-k/pairs, adapter to round-k/adapter.")
    method: Literal["dpo", "sft"] = Field(
        "dpo", description="The recipe, run as `python -m trainer.<method>`: dpo (TRL's DPOTrainer on the pairs; "
        "train.loss_type picks DPO, IPO, hinge, ... or a mix) or sft (TRL's SFTTrainer on the pairs' chosen answers "
        "only: rejection-sampling fine-tuning, no reference model and no rejected side). Both write a LoRA adapter.")
    backend: Literal["auto", "unsloth", "peft"] = Field(
        "auto", description="auto: unsloth when CUDA and unsloth are present, else peft (transformers + PEFT)."
    )
    base_model: str | None = Field(
        None, description="16-bit model dir (or packaged name) to train; default: model.base (with "
        "continue_adapter), else model.base in round 0 and round-(k-1)/merged after."
    )
    continue_adapter: bool = Field(
        True, description="Round k>0 keeps training round k-1's adapter over the ORIGINAL base (its frozen copy is "
        "the DPO reference), so each round starts from the policy the last one produced. false = a fresh LoRA on "
        "round k-1's merge, whose small update a 4-bit load of the merge can round away."
    )
    pairs_dir: Path | None = Field(None, description="Dir of parquet pair shards; default round-k/pairs.")
    output_dir: Path | None = Field(None, description="Final adapter dir; default round-k/adapter (checkpoints, "
                                    "logs and plots go to its sibling train/).")
    load_in_4bit: bool = Field(True, description="GPU only: 4-bit base (QLoRA): ~1/4 of the weight memory, "
                               "a small quality cost. Ignored on CPU (float32).")
    lora_r: int = Field(64, ge=1, description="LoRA rank: higher = more capacity, more memory and optimizer state.")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA scale numerator; default = lora_r (scale 1). "
                                   "The original plan's 16 with r=64 scales updates by 0.25.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="0 lets Unsloth use its fast path; >0 regularizes.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(SEVEN_PROJECTIONS),
        description="Modules that get LoRA; all seven projections learn best, fewer save memory.",
    )
    beta: float = Field(0.1, gt=0.0, description="DPO beta: higher keeps the policy closer to the reference.")
    loss_type: LossType | list[LossType] = Field(
        "sigmoid", description="TRL's DPO loss, or several combined with loss_weights (e.g. [sigmoid, sft]: DPO plus "
        "an SFT term on chosen, which keeps chosen's likelihood up). Checked before any model loads.")
    loss_weights: list[float] | None = Field(None, description="One weight per loss_type entry; default 1.0 each.")
    ld_alpha: float | None = Field(None, ge=0.0, le=1.0, description="LD-DPO (TRL's ld_alpha): the response tokens "
                                   "past the shorter response of a pair count this much in its log-probs (0 = "
                                   "only the shared length; None = plain DPO). Damps DPO's pull toward whichever "
                                   "length the chosen answers have. Set, the trainer computes its own reference "
                                   "log-probs (the supplied ones are whole-response sums).")
    learning_rate: float = Field(5e-6, gt=0.0, description="Higher learns faster but can collapse rewards.")
    lr_scheduler_type: str = Field("linear", description="transformers scheduler name (linear, cosine, constant).")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps spent warming up the LR.")
    per_device_train_batch_size: int | Literal["auto"] = Field(
        2, description="Pairs per forward; 'auto' = largest of 1/2/4/8 the planner fits (peft on CPU: 1). "
        "Higher = faster, more memory."
    )
    gradient_accumulation_steps: int = Field(4, ge=1, description="Effective batch = batch x this; no memory cost.")
    num_train_epochs: float = Field(1.0, gt=0.0, description="Passes over the pairs; >1 risks overfitting.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    max_length: int = Field(2048, ge=8, description="Prompt+response tokens; longer rows are cut (more memory "
                            "if higher).")
    max_prompt_length: int = Field(1536, ge=1, description="Data check: prompts longer than this are reported "
                                   "(they leave little room for the response).")
    max_truncated_fraction: float = Field(0.05, ge=0.0, le=1.0, description="Data check fails when more rows than "
                                          "this would lose response tokens to max_length.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations: ~30% slower, far less memory.")
    precompute_ref_log_probs: bool = Field(
        False, description="Score the reference once before training (TRL); used automatically when the pairs carry "
        "ref_chosen_logps/ref_rejected_logps."
    )
    ref_check_rows: int = Field(4, ge=0, description="Rows on which supplied reference log-probs are recomputed.")
    ref_check_tolerance: float = Field(0.05, gt=0.0, description="Max mean |difference| per response token (nats) "
                                       "between supplied and recomputed reference log-probs.")
    gpu_wait_s: float = Field(120.0, ge=0.0, description="GPU only: before the model loads, wait up to this long "
                              "for the memory the planner says training needs to be free (a server stopping "
                              "just before gives it back in seconds), then refuse, naming who holds it.")
    seed: int = Field(3407, description="Seeds LoRA init, data order and dropout.")
    logging_steps: int = Field(1, ge=1, description="Log every N steps (also how often NaN/inf loss is checked).")
    save_steps: int | Literal["auto"] = Field(
        "auto", description="Adapter checkpoint every N steps (lower loses less on a crash); auto = a quarter of the "
        "round's optimizer steps, so that a round of any size is checkpointed (and evaluated) four times.")
    save_total_limit: int | None = Field(3, ge=1, description="Checkpoints kept on disk (oldest deleted).")
    eval_split: float = Field(0.05, ge=0.0, lt=1.0, description="Held-out share of pairs for eval/early stopping; "
                              "0 disables both.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps; default = save_steps.")
    early_stopping_metric: Literal["rewards/accuracies", "rewards/margins"] = Field(
        "rewards/accuracies", description="DPO: the eval metric that must keep improving (sft stops on the eval "
        "loss, which must keep falling)."
    )
    early_stopping_patience: int | None = Field(3, ge=1, description="Evals without improvement before stopping; "
                                                "null disables.")
    optim: str = Field("adamw_torch", description="transformers optimizer; adamw_8bit saves GPU memory.")
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"], description="tensorboard, wandb, ... "
                                 "([] for none).")

    @field_validator("save_steps")
    @classmethod
    def _positive_or_auto(cls, v: Any) -> Any:
        return _count_or_auto(v, "a quarter of the round's steps")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _known_losses(cls, v: Any) -> Any:
        names = [v] if isinstance(v, str) else v if isinstance(v, list) else []
        unknown = [n for n in names if n not in get_args(LossType)]
        if unknown:
            raise ValueError(f"unknown DPO loss {unknown[0]!r}; TRL 1.15 has {', '.join(get_args(LossType))}")
        return v

    @model_validator(mode="after")
    def _weights_match_losses(self) -> TrainConfig:
        n = 1 if isinstance(self.loss_type, str) else len(self.loss_type)
        if self.loss_weights is not None and len(self.loss_weights) != n:
            raise ValueError(f"train.loss_weights has {len(self.loss_weights)} weight(s) for {n} loss_type "
                             "entr(y/ies): give one per loss, or leave it out")
        return self


class MergeConfig(Section):
    """Merge the round's adapter into the ORIGINAL 16-bit base (``python -m trainer.merge``); uses train.round."""

    base_model: str | None = Field(None, description="16-bit base dir; default: the base train used.")
    adapter_dir: Path | None = Field(None, description="Adapter to merge; default round-k/adapter.")
    output_dir: Path | None = Field(None, description="Merged model dir; default round-k/merged.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Saved weight dtype; auto = the base's own dtype."
    )
    probe_prompts: list[str] = Field(
        default_factory=lambda: [
            "Write a short poem about the sea.",
            "List three colors. Answer in all lowercase letters.",
            "Explain what a prime number is in one sentence.",
        ],
        description="Instructions (rendered with the template) on which merged and adapter models must agree.",
    )
    max_kl: float = Field(1e-2, gt=0.0, description="Fail when the mean next-token KL(adapter||merged) exceeds this "
                          "(bf16 rounding alone measured 0.0018 on SmolLM2-135M; a garbled merge is far above).")
    min_top1: float = Field(0.98, ge=0.0, le=1.0, description="Fail when top-1 agreement is below this (bf16: ~0.995).")


class PairsConfig(Section):
    """Preference-pair building (``python -m pair_builder``); cross-field checks live in pair_builder.settings."""

    round: int = Field(0, ge=0, description="Round k: pairs go to round-k/pairs; the served model is model_k.")
    servers: list[str] = Field(default_factory=list, description="gen_server URLs to balance over; [] = server.base_url.")
    api_key: str | None = Field(None, description="Key of those servers; default server.api_key, env GEN_SERVER_API_KEY.")
    model: str | None = Field(None, description="Served model name sent as `model`; default: the first one /v1/models lists.")
    model_revision: str | None = Field(None, description="Identifies the weights in pair ids; default: the served model's root dir.")
    health_timeout_s: float = Field(30.0, gt=0, description="Wait this long for each server's /health before failing.")
    constitution: Path | None = Field(None, description="Principle dir; default constitution/principles.")
    sources: list[Literal["seed", "self_instruct", "file"]] = Field(
        default_factory=lambda: ["seed"], description="Where instructions come from (any mix).")
    seed_tasks: Path | None = Field(None, description="Seed task JSONL; default constitution/seed_tasks.jsonl (train split only).")
    seed_variants: int = Field(2, ge=1, description="Constraint draws per seed task: more pairs per task, less diversity.")
    max_constraints: int = Field(3, ge=1, le=3, description="Verifiable constraints per generated instruction (1..this).")
    self_instruct_tasks: int = Field(0, ge=0, description="New tasks the served model writes (before dedupe).")
    self_instruct_shots: int = Field(8, ge=1, description="Seed tasks shown per self-instruct request.")
    input_file: Path | None = Field(None, description="User JSONL/parquet: `instruction` (verbatim) or `task`, optional `constraints`.")
    dedupe_threshold: float = Field(0.8, gt=0.0, le=0.95, description="MinHash Jaccard above which tasks are "
                                    "near-duplicates (at most 0.95: LSH over 64 permutations resolves no finer).")
    max_instructions: int | None = Field(None, ge=1, description="Use only the first N instructions (after dedupe).")
    max_pairs: int | None = Field(None, ge=1, description="Stop once this many pairs are kept (counting earlier runs).")
    k: int = Field(2, ge=1, description="Responses sampled per instruction (one request, n=k); more = better pairs, more tokens.")
    revisions: int = Field(1, ge=0, description="Critique-rewrite passes R; 0 = pairs from samples only.")
    max_tokens: int = Field(256, ge=1, description="Tokens per response or rewrite; too low truncates (dropped).")
    critique_max_tokens: int = Field(160, ge=1, description="Tokens per critique.")
    temperature: float = Field(0.8, ge=0.0, description="Sampling temperature of responses; diversity among the k samples.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling for the k samples and rewrites.")
    critique_temperature: float = Field(0.3, ge=0.0, description="Critique and rewrite temperature; low = focused edits.")
    seed: int = Field(0, description="Seeds constraint draws, principle choice and request seeds.")
    no_constraint_rule: Literal["drop", "critique", "prefer_rewrite"] = Field(
        "critique", description="Instructions without constraints: drop them, keep rewrite>original when the critique "
        "said NEEDS REVISION, or always prefer the rewrite.")
    min_chars: int = Field(1, ge=1, description="Chosen and rejected must be at least this long.")
    max_chars: int = Field(8000, ge=1, description="... and at most this long.")
    max_length_ratio: float = Field(3.0, ge=1.0, description="Longer/shorter of chosen and rejected; guards length hacking.")
    min_edit_distance: float = Field(0.02, ge=0.0, le=1.0, description="Normalized Levenshtein; below = no signal.")
    max_edit_distance: float = Field(0.8, ge=0.0, le=1.0, description="Above = unrelated responses, not a contrast "
                                     "(letter case ignored). 0.8: of 186 labelled real pairs it drops 11 (9 not worth "
                                     "learning) and of the same chosen answers paired with another instruction's "
                                     "rejected 42; char-level distance separates them only weakly "
                                     "(pair_builder.audit --labelled --sweep).")
    pair_rule: Literal["dominance", "count"] = Field(
        "dominance", description="dominance: chosen passes every constraint rejected passes and at least one more "
        "(else drop not_dominant); count: chosen passes more constraints.")
    copy_span: int = Field(8, ge=0, description="Rule out a candidate sharing this many consecutive words with a "
                           "few-shot example answer of the template or a principle (or all of a shorter one); 0 = off.")
    rule_out_looping: bool = Field(True, description="Rule out candidates eval.degeneration.is_looping calls looping.")
    rule_out_fewshot: bool = Field(True, description="Rule out candidates that talk about the template's few-shot "
                                   "examples instead of their instruction (eval.degeneration.mentions_fewshot, the "
                                   "round's instructions judge which example words are rare): DPO rounds on a "
                                   "270M base model taught it to half of its answers (docs/training.md).")
    drop_unrequested_habits: bool = Field(True, description="Drop a pair whose chosen answer is all-lowercase, "
                                          "all-uppercase or a bullet list when its instruction did not ask for it "
                                          "(and rejected is not): such pairs teach the habit everywhere (measured on "
                                          "gemma3-270m: unrequested lowercase 1.8% -> 16.4% after one round; "
                                          "bullets 2.4% -> 51% in two).")
    habit_contrast: float = Field(0.25, ge=0.0, description="Habit-contrast pairs (an answer to an instruction that "
                                  "did not ask for all-lowercase / all-uppercase / no commas, against itself with the "
                                  "habit applied; pair_builder.extras) per pair that pushes a habit up beyond those "
                                  "that push it down. A contrast pushes far harder than a checker pair: on gemma3-270m "
                                  "one per lowercase pair turned lowercase down everywhere, asked or not "
                                  "(bench/contrast_probe.py, docs/training.md); 0.25 is near neutral. 0 = off.")
    incidental_habit_weight: float = Field(0.25, ge=0.0, le=1.0, description="How much a pair counts toward a "
                                           "habit's push (pairs.habit_contrast) when its instruction did not ask "
                                           "for the habit: then the habit is one difference among many. On "
                                           "gemma3-270m, 23 such pairs against lowercase did not offset 26 that "
                                           "asked for it (docs/training.md); 1 = count them fully.")
    stop_pairs: float = Field(0.0, ge=0.0, description="Stop pairs per checker pair: a finished answer against a "
                              "looping or truncated one of the same instruction that passes no more constraints "
                              "(pair_builder.extras). For base models that loop to the token limit; 0 = off.")
    repair_pairs: float = Field(0.0, ge=0.0, description="Format-repair pairs per checker pair: an answer with the "
                                "format instructions it missed applied by rule (paragraphs, sections, bullets, "
                                "highlights, postscript, two responses, end phrase, JSON; pair_builder.repair), "
                                "against the answer as written, when the checkers pass it on more constraints. For "
                                "base models whose samples never show a format; eval.heldout_types are never "
                                "repaired. 0 = off.")
    min_task_overlap: float | None = Field(0.2, ge=0.0, le=1.0, description="Chosen must use this share of the task's "
                                           "content words (free; precision 0.86, recall 0.68 for chosen answers "
                                           "labelled irrelevant among 186 labelled pairs); null = off.")
    min_pmi: float | None = Field(None, description="Chosen's PMI relevance must reach this (one echo request per "
                                  "item; on the labelled pairs it separates worse than min_task_overlap and adds "
                                  "nothing to it, so off); null = off.")
    audit_sample: int = Field(200, ge=0, description="Pairs the dataset card's audit checks (pair_builder.audit); 0 = none.")
    ref_logprobs: bool = Field(True, description="Score ref_chosen_logps/ref_rejected_logps on the server (1 request per pair).")
    eos_token: str | None = Field(None, description="Appended to each response when scoring reference log-probs, as "
                                  "TRL appends it before training; default: eos_token of the served model dir's "
                                  "tokenizer (set it when that dir is not readable from here).")
    in_flight_per_server: int = Field(8, ge=1, description="Items in flight per server (each sends its requests in turn).")
    actor_max_restarts: int = Field(3, ge=0, description="Restarts of a lost actor; its unfinished items are retried.")
    shard_size: int = Field(256, ge=1, description="Pairs per parquet shard; smaller loses less on a crash.")
    ray_address: str | None = Field(None, description="Ray address; None = Ray's default (RAY_ADDRESS, else a running "
                                    "local cluster, else a new one); 'local' = always a new in-process Ray.")
    progress: bool = Field(True, description="Live progress bar (pairs/s, tokens/s, acceptance, ETA, cost).")
    record_candidates: bool = Field(False, description="Write every candidate (raw completion, checks, problem) of "
                                    "every item to pairs/.meta/candidates.jsonl, for audits and labelling.")


class GuardsConfig(Section):
    """Promotion guards: round k>0 is promoted only when, besides a higher gate metric, its degeneration stays
    within these bounds of round 0's and its held-out-type score does not fall. Tighter bounds refuse more
    real gains to small-suite noise; looser ones let the score rise through habits (lowercase, no commas,
    long looping answers) that satisfy some instructions by accident."""

    enabled: bool = Field(True, description="false = promote on the gate metric alone (not recommended).")
    max_truncation_rise: float = Field(0.05, ge=0.0, description="Share of answers cut at max_tokens may exceed "
                                       "round 0's by at most this.")
    max_loop_rise: float = Field(0.02, ge=0.0, description="Share of looping answers may exceed round 0's by at "
                                 "most this; loops are rare in a healthy model, so the bound is tight.")
    max_habit_rise: float = Field(0.10, ge=0.0, description="Each unrequested habit (all-lowercase, all-uppercase, "
                                  "comma-free, over eval.long_answer_words; each over prompts that did not ask for "
                                  "it) may exceed round 0's share by at most this.")
    max_length_ratio: float = Field(2.0, ge=1.0, description="Median answer length (words) may be at most this "
                                    "multiple of round 0's, and at least round 0's divided by it: rounds that "
                                    "teach 'write long' or 'say little' (stop pairs alone taught a base model to "
                                    "answer in 11 words, from 26) are both refused.")
    heldout_tolerance: float = Field(0.0, ge=0.0, description="The held-out-type score (instruction level, loose or "
                                     "strict as the gate metric) may fall at most this below round 0's and the "
                                     "previous round's; a larger drop refuses the round only when its paired 95% "
                                     "bootstrap interval lies below 0. IFEval asks the five default held-out types "
                                     "197 times, so a point estimate alone moves by about 3 points between equal "
                                     "models: gemma3-270m's third GPU run was refused on a -0.005 drop.")


class PipelineConfig(Section):
    """The round loop (``python -m pipeline run``); stopping rules beyond eval.target and cost.budget_usd."""

    rounds: int = Field(3, ge=1, description="Max DPO rounds; each costs a pair build, a training run and an eval.")
    min_gain: float = Field(0.01, ge=0.0, description="Plateau: stop when the gate metric gained less than this "
                            "over the previous round.")
    rollback_on_regression: bool = Field(True, description="A round significantly worse than the one before "
                                         "(eval's 95% bootstrap interval below 0) is not promoted; the run stops.")
    pairs_runner: Literal["inprocess", "ray_job"] = Field(
        "inprocess", description="inprocess: pair_builder as a child process with its own local Ray (the CPU "
        "demo); ray_job: `ray job submit` to pairs.ray_address / RAY_ADDRESS."
    )
    server_log_dir: Path | None = Field(None, description="Where gen_server logs go; default the run dir.")
    guards: GuardsConfig = Field(default_factory=GuardsConfig)


class Config(Section):
    """The whole pipeline's config. Later stages add their own sections here."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)


C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def _format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            problems.append(f"{loc}: unknown key (check the spelling; every key is in docs/config.md)")
        else:
            problems.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return problems


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (``pairs:`` twice would silently drop the
    first section's settings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"{key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}): "
                                    "the second would silently replace the first; merge them into one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    cls: type[C] = Config,  # type: ignore[assignment]
) -> C:
    """Load ``path`` (YAML), apply ``a.b=c`` overrides (values parsed as YAML), validate everything."""
    problems: list[str] = []
    data: dict[str, Any] = {}
    source = str(path) if path else "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"file not found: {p} (pass an existing YAML file, e.g. configs/demo-cpu.yaml)"], source)
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        except _DuplicateKey as e:
            raise ConfigError([str(e)], source) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        except UnicodeDecodeError:
            raise ConfigError(["not a text (UTF-8) file: pass a YAML config, e.g. configs/demo-cpu.yaml"],
                              source) from None
        if loaded is None:
            raise ConfigError(["the file is empty (or only comments): add the sections to set, or leave out "
                               "--config to run on the defaults"], source)
        if not isinstance(loaded, dict):
            raise ConfigError([f"top level must be a mapping of sections, got {type(loaded).__name__}"], source)
        data = loaded
    for ov in overrides or []:
        key, sep, raw = ov.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {ov!r}: expected the form section.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # a plain string that merely looks odd to YAML
        _set_dotted(data, key, value)
    try:
        cfg = cls.model_validate(data)
    except ValidationError as e:
        problems.extend(_format_validation_error(e))
        cfg = None
    if problems:
        raise ConfigError(problems, source)
    assert cfg is not None
    return cfg


SECRET_FIELDS = ("api_key",)  # never written to a run dir, a report or a log
REDACTED = "<redacted>"


def redacted(cfg: BaseModel, mark: str | None = REDACTED) -> dict[str, Any]:
    """The config as JSON-able dicts with every secret (:data:`SECRET_FIELDS`, at any depth) that is set
    replaced by ``mark``."""
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: (mark if k in SECRET_FIELDS and v is not None else walk(v)) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x
    return walk(cfg.model_dump(mode="json"))


def dump_config(cfg: BaseModel) -> str:
    """The config as YAML for people (reports, logs): secrets show as ``<redacted>``."""
    return yaml.safe_dump(redacted(cfg), sort_keys=False)


def save_config(cfg: BaseModel, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config (defaults filled in) atomically; reloading it gives the same config, less its
    secrets: they are saved as null (a stage started from the saved file takes its key from the environment,
    ``GEN_SERVER_API_KEY``, as the pipeline passes it)."""
    return atomic_write_text(path, "# secrets (api_key) are not saved here: they come from GEN_SERVER_API_KEY\n"
                             + yaml.safe_dump(redacted(cfg, None), sort_keys=False))


def add_config_args(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--config CFG`` plus trailing ``a.b=c`` overrides, the way every stage's CLI takes them."""
    parser.add_argument("--config", required=required, help="YAML config file (see configs/).")
    parser.add_argument("overrides", nargs="*", metavar="a.b=c", help="Override a config value.")


def config_from_args(args: argparse.Namespace, cls: type[C] = Config) -> C:  # type: ignore[assignment]
    return load_config(args.config, args.overrides, cls)


REFERENCE_PATH = "docs/config.md"


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "None").replace("pathlib.", "")
    return re.sub(r"<class '([\w.]+)'>", r"\1", text)


def config_reference() -> str:
    """Every setting, section by section: key, type, default and what it does (the Markdown of
    :data:`REFERENCE_PATH`; regenerate it with ``python -m shared.config > docs/config.md``)."""
    lines = ["# Config reference", "",
             "Every setting of `python -m pipeline run --config CFG` and of each stage's CLI, by section. Set them in",
             "the YAML file (`section:` then `key: value`) or override any on the command line as `section.key=value`.",
             "Generated from `shared/config.py` by `python -m shared.config > docs/config.md`; a test keeps it current.",
             ""]
    def rows(prefix: str, section: type[BaseModel]) -> list[str]:
        out = []
        for key, f in section.model_fields.items():
            default = f.default_factory() if f.default_factory is not None else f.default
            if isinstance(default, BaseModel):  # a nested section: its keys, one row each
                out += rows(f"{prefix}.{key}", type(default))
                continue
            desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{prefix}.{key}` | `{_type_name(f.annotation)}` | `{json.dumps(default, default=str)}` "
                       f"| {desc} |")
        return out

    for name, field in Config.model_fields.items():
        section = field.annotation
        doc = " ".join((section.__doc__ or "").strip().split("\n\n")[0].split())
        lines += [f"## `{name}`", "", *([doc, ""] if doc else []),
                  "| key | type | default | what it does |", "|---|---|---|---|", *rows(name, section), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference(), end="")
