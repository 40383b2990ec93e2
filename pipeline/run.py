"""The round loop. Round k serves model_k (round 0: ``model.base``; then round k-1's merge), evaluates it
into ``round-k/eval``, decides whether to stop, builds ``round-k/pairs`` from it, stops the server (the
GPU is free before training), trains ``round-k/adapter`` and merges ``round-k/merged`` = model_k+1.

Stopping rules, checked after each eval: regression (round k significantly worse than k-1 by eval's paired
bootstrap: model_k is not promoted); a failed promotion guard (``pipeline.guards``: degeneration - truncation,
loops, unrequested habits, median length, longer or shorter - beyond its bound of round 0's, or the score on the
held-out instruction types significantly below round 0's or round k-1's: model_k is not promoted); target reached (``eval.target``
on ``eval.gate_metric``); plateau (gain below ``pipeline.min_gain``); budget spent (``cost.budget_usd``); max
rounds. A round that is not promoted hands over to the best earlier round that passed.

Stages run as child processes through their own CLIs (the same commands users run by hand), so the
pipeline holds no model code and no GPU memory itself.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gen_server.process import start_replicas, stop_all
from pipeline.state import RunState
from shared.config import Config, ConfigError, load_config, redacted
from shared.ledger import CostLedger
from shared.procs import die_with_parent, kill_leftovers, stop_group
from shared.rundir import RunDir

log = logging.getLogger(__name__)
_CRASH_ENV = "SELFALIGN_PIPELINE_CRASH_AFTER"  # tests: die right after this step is recorded


class PipelineError(RuntimeError):
    pass


def model_of_round(cfg: Config, rd: RunDir, k: int) -> Path:
    if k == 0:
        from gen_server.models import resolve_model

        return Path(resolve_model(cfg.model.base))
    return rd.round(k - 1, create=False).merged


STAGE_STOP_GRACE_S = 30.0  # a trainer saving its last checkpoint, pair_builder flushing its shard
TRAIN_BUDGET_EXIT = 3  # the trainer's exit code when it stopped at cost.budget_usd (trainer.recipe.cli)


def _stage(cmd: list[str], step: str, env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> int:
    """Run one stage as a child in a process group of its own, and leave nothing of it behind: stopped (group
    SIGTERM, then SIGKILL) when the pipeline is interrupted or fails, SIGTERMed by the kernel when the pipeline
    dies outright, and its group's leftovers (Ray agents of a driver that died) killed when it ends."""
    log.info("[%s] %s", step, " ".join(cmd))
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, start_new_session=True,
                            preexec_fn=die_with_parent)
    try:
        rc = proc.wait()
    except BaseException:
        log.warning("[%s] interrupted: stopping it", step)
        stop_group(proc, STAGE_STOP_GRACE_S, step)
        raise
    if kill_leftovers(proc.pid):
        log.warning("[%s] left processes behind in its group; killed them", step)
    if rc not in ok:
        raise PipelineError(f"step {step} failed with exit code {rc} (its output is above). Fix the cause and run "
                            f"`python -m pipeline run` again: finished steps are kept and this one resumes.")
    return rc


def _mark(state: RunState, step: str, **info: Any) -> None:
    state.mark(step, **info)
    if os.environ.get(_CRASH_ENV) == step:
        log.error("%s=%s: exiting abruptly (crash test)", _CRASH_ENV, step)
        os._exit(137)


def _check_saved_config(rd: RunDir, cfg: Config) -> None:
    """Save the resolved config; when a run continues under a changed one, say what changed.

    Changing settings of steps still to come is how a failed step gets fixed (e.g. merge.dtype), so it is
    allowed; finished steps are not redone, and the stages refuse to mix their own outputs (eval's response
    cache, pair_builder's pairs dir) when a setting that shaped them changed.
    """
    if rd.config_path.exists():
        a, b = redacted(load_config(rd.config_path), None), redacted(cfg, None)  # secrets are never saved
        diff = [f"{s}.{k}: {a[s].get(k)!r} -> {b[s].get(k)!r}" for s in a for k in sorted(set(a[s]) | set(b[s]))
                if a[s].get(k) != b[s].get(k)]
        if diff:
            log.warning("continuing %s with a changed config: %s", rd.path, "; ".join(diff))
    rd.save_config(cfg)


def _measures(cfg: Config, rd: RunDir) -> Any:
    """Round j -> its eval's degeneration and held-out blocks under this config's settings (read once per j)."""
    from eval.report import measures_of

    cache: dict[int, dict[str, Any]] = {}

    def get(j: int) -> dict[str, Any]:
        if j not in cache:
            cache[j] = measures_of(rd.round(j, create=False).eval, heldout_types=cfg.eval.heldout_types,
                                   long_words=cfg.eval.long_answer_words)
        return cache[j]
    return get


def read_scores(eval_dir: Path) -> dict[str, Any]:
    """A round's ``scores.json``, with the clean metrics (eval.report.CLEAN_METRICS) filled in from its results
    when an eval of an earlier version did not record them."""
    from eval.report import CLEAN_METRICS, clean_scores, read_results

    scores = json.loads((eval_dir / "scores.json").read_text())
    if any(m not in scores for m in CLEAN_METRICS) and (rows := read_results(eval_dir)):
        scores.update(clean_scores(rows))
    return scores


def guard_failures(cfg: Config, rd: RunDir, k: int, measures: Any = None) -> list[str]:
    """Why round k may not be promoted although its gate metric rose: one line per measure outside
    ``pipeline.guards`` (with the numbers); empty when it passes. Degeneration is compared with round 0, the
    held-out-type score with round 0 and with round k-1. A measure an eval could not compute (an old eval
    without responses, a suite that asks no held-out type) is skipped with a warning."""
    g = cfg.pipeline.guards
    if k == 0 or not g.enabled:
        return []
    from eval.degeneration import HABITS, flat

    get = measures or _measures(cfg, rd)
    fails: list[str] = []
    d0, dk = get(0)["degeneration"], get(k)["degeneration"]
    if d0 is None or dk is None:
        log.warning("round %d: degeneration not measured in round %d's eval (results without responses); its "
                    "guards are skipped", k, 0 if d0 is None else k)
    else:
        f0, fk = flat(d0), flat(dk)
        bounds = [("truncation_rate", g.max_truncation_rise, "max_truncation_rise"),
                  ("loop_rate", g.max_loop_rise, "max_loop_rise"),
                  *((f"{h}_rate", g.max_habit_rise, "max_habit_rise") for h in HABITS)]
        for m, bound, name in bounds:
            a, b = f0.get(m), fk.get(m)
            if a is not None and b is not None and b - a > bound + 1e-9:
                fails.append(f"{m} {b:.3f} vs {a:.3f} in round 0 ({b - a:+.3f} > pipeline.guards.{name}={bound})")
        a, b = f0["words_median"], fk["words_median"]
        if b > g.max_length_ratio * max(a, 1.0) + 1e-9:
            fails.append(f"words_median {b:.0f} vs {a:.0f} in round 0 ({b / max(a, 1.0):.1f}x > "
                         f"pipeline.guards.max_length_ratio={g.max_length_ratio})")
        elif max(b, 1.0) * g.max_length_ratio < a - 1e-9:
            fails.append(f"words_median {b:.0f} vs {a:.0f} in round 0 (1/{a / max(b, 1.0):.1f}x < "
                         f"1/pipeline.guards.max_length_ratio=1/{g.max_length_ratio})")
    level = "loose" if "loose" in cfg.eval.gate_metric else "strict"
    hk = (get(k)["heldout"] or {}).get(level)
    if hk is None:
        if cfg.eval.heldout_types:
            log.warning("round %d: the eval asks none of the held-out types %s: the held-out guard is skipped",
                        k, cfg.eval.heldout_types)
        return fails
    for j in sorted({0, k - 1}):
        hj = (get(j)["heldout"] or {}).get(level)
        if hj is None or hk >= hj - g.heldout_tolerance - 1e-9:
            continue
        c = _heldout_change(cfg, rd, j, k, level)
        if c is not None and not (c["significant"] and c["delta"] < 0):
            continue  # a drop inside the noise of this many instructions
        ci = f", 95% CI {c['ci95'][0]:+.3f}..{c['ci95'][1]:+.3f}" if c and c["ci95"] else ""
        fails.append(f"held-out types' instruction_{level} {hk:.3f} vs {hj:.3f} in round {j} ({hk - hj:+.3f}{ci}, "
                     f"below pipeline.guards.heldout_tolerance={g.heldout_tolerance}; "
                     f"{get(k)['heldout']['n_instructions']} instructions)")
    return fails


def _heldout_change(cfg: Config, rd: RunDir, j: int, k: int, level: str) -> dict[str, Any] | None:
    """Round k's held-out-type score minus round j's with its paired 95% bootstrap interval
    (:func:`eval.report.compare`); None when the two evals cannot be paired (a result file missing)."""
    from eval.report import compare

    try:
        c = compare(rd.round(j, create=False).eval, rd.round(k, create=False).eval,
                    heldout_types=cfg.eval.heldout_types, long_words=cfg.eval.long_answer_words)
    except (FileNotFoundError, ValueError):
        return None
    return (c.get("heldout") or {}).get(level)


def _fallback(cfg: Config, rd: RunDir, k: int, measures: Any) -> tuple[int, str]:
    """The best round before k (gate metric; the earlier on a tie) whose promotion guards passed, and its model."""
    def gate(j: int) -> float:
        return read_scores(rd.round(j, create=False).eval)[cfg.eval.gate_metric]

    passed = [j for j in range(k) if not guard_failures(cfg, rd, j, measures)]  # round 0 always passes
    best = max(passed, key=lambda j: (gate(j), -j))
    return best, str(model_of_round(cfg, rd, best))


def decide(cfg: Config, rd: RunDir, k: int) -> tuple[str, str | None] | None:
    """(reason, promoted model dir) when the loop should stop after round k's eval, else None.

    Round k>0 is promoted only when its gate metric rose over round k-1 AND its promotion guards pass
    (:func:`guard_failures`: degeneration within bounds of round 0, held-out-type score not below round 0's
    or round k-1's). A significant regression or a failed guard stops the run and rolls back to the best
    earlier round that passed; target, plateau, budget and max rounds then stop it as before."""
    from eval.report import compare

    ev = cfg.eval
    scores = read_scores(rd.round(k, create=False).eval)
    this_model = str(model_of_round(cfg, rd, k))
    measures = _measures(cfg, rd)
    gain = None
    if k > 0:
        prev_eval = rd.round(k - 1, create=False).eval
        c = compare(prev_eval, rd.round(k, create=False).eval, heldout_types=ev.heldout_types,
                    long_words=ev.long_answer_words)["metrics"][ev.gate_metric]
        if cfg.pipeline.rollback_on_regression and c["significant"] and c["delta"] < 0:
            j, model = _fallback(cfg, rd, k, measures)
            return (f"regression: round {k} scored {c['b']:.4f} vs {c['a']:.4f} in round {k - 1} on {ev.gate_metric} "
                    f"(95% CI of the change {c['ci95'][0]:+.4f}..{c['ci95'][1]:+.4f}); round {j}'s model is kept",
                    model)
        prev = read_scores(prev_eval)
        gain = scores[ev.gate_metric] - prev[ev.gate_metric]
        fails = guard_failures(cfg, rd, k, measures)
        if fails:
            j, model = _fallback(cfg, rd, k, measures)
            return (f"guard failed: round {k} ({ev.gate_metric} {scores[ev.gate_metric]:.4f}, {gain:+.4f} over round "
                    f"{k - 1}) is not promoted: " + "; ".join(fails)
                    + f"; round {j}'s model is kept (the best earlier round that passed)", model)
    # guards passed; round k>0 is promoted only if its gate metric rose, else the best earlier round is
    promoted, kept = this_model, ""
    if gain is not None and gain <= 0:
        j, promoted = _fallback(cfg, rd, k, measures)
        kept = f"; round {k} did not raise {ev.gate_metric} ({gain:+.4f}): round {j}'s model is kept"
    if scores[ev.gate_metric] >= ev.target:
        return f"target reached: {ev.gate_metric}={scores[ev.gate_metric]:.4f} >= {ev.target}{kept}", promoted
    if gain is not None and gain < cfg.pipeline.min_gain:
        # within noise either way: keep the better-scoring model
        return (f"plateau: {ev.gate_metric} gained {gain:+.4f} over round {k - 1} "
                f"(< pipeline.min_gain={cfg.pipeline.min_gain}){kept}", promoted)
    spent = rd.spent_usd() if cfg.cost.budget_usd is not None else 0.0  # reads every round's ledger: once
    if cfg.cost.budget_usd is not None and spent >= cfg.cost.budget_usd:
        return f"budget spent: ${spent:.2f} >= cost.budget_usd=${cfg.cost.budget_usd:.2f}{kept}", promoted
    if k >= cfg.pipeline.rounds:
        return f"max rounds: {cfg.pipeline.rounds} round(s) trained{kept}", promoted
    return None


def pairs_command(cfg: Config, cfg_path: Path, k: int, server_urls: list[str], api_key: str,
                  cluster_url: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The pair_builder invocation for round k: a child process with its own local Ray, or a `ray job submit`
    to a cluster: pairs.ray_address, else RAY_ADDRESS, else ``cluster_url`` (the job API of the cluster the
    servers run on), else the local default. The job's driver joins the cluster it runs on
    (``pairs.ray_address=auto``: inside a job, RAY_ADDRESS is that cluster's), whatever address it was submitted
    to. The key never goes on a command line (visible in `ps`): it is in the child's environment, or in the
    job's runtime env, written to a private (0600) file beside the config."""
    args = ["--config", str(cfg_path), f"pairs.round={k}", f"pairs.servers=[{','.join(server_urls)}]"]
    env = {"GEN_SERVER_API_KEY": api_key}
    if cfg.pipeline.pairs_runner == "inprocess":
        return [sys.executable, "-m", "pair_builder", *args], env
    address = cfg.pairs.ray_address or os.environ.get("RAY_ADDRESS") or cluster_url or "http://127.0.0.1:8265"
    args.append("pairs.ray_address=auto")
    ray_cli = Path(sys.executable).with_name("ray")  # this environment's, whether activated or not
    runtime_env = cfg_path.parent / f".pairs-runtime-env-round-{k}.json"  # JSON is YAML, as --runtime-env wants
    fd = os.open(runtime_env, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"env_vars": env}, f)
    cmd = [str(ray_cli) if ray_cli.exists() else "ray", "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env", str(runtime_env), "--", "python", "-m", "pair_builder", *args]
    return cmd, {}


def _placement(cfg: Config) -> tuple[Any, Any]:
    """How round servers start and stop: on this node, or as Ray actors on the cluster (server.placement)."""
    if cfg.server.placement == "ray":
        from gen_server.cluster import start_on_ray, stop_on_ray

        return start_on_ray, stop_on_ray
    return start_replicas, stop_all


def _cluster_jobs_url(cfg: Config) -> str | None:
    """The job API of the cluster the servers run on (server.placement=ray), for a ray_job pair build."""
    if cfg.server.placement != "ray" or cfg.pipeline.pairs_runner != "ray_job":
        return None
    from gen_server.cluster import dashboard_url

    return dashboard_url()


def _serve_phase(cfg: Config, rd: RunDir, state: RunState, k: int, cfg_path: Path) -> tuple[str, str | None] | None:
    """Everything round k needs the server for: base check, eval, stop decision, pairs."""
    from eval.base_check import check as base_check
    from eval.run import config_settings, run_eval

    rk = rd.round(k)
    model_dir = model_of_round(cfg, rd, k)
    if state.done(f"round-{k}/eval") and (k > 0 or state.done("round-0/base_check")):
        # continuing a run: no server unless a served step is left
        stop = decide(cfg, rd, k)
        if stop is not None or state.done(f"round-{k}/pairs"):
            return stop or _no_pairs(state, rk, k, model_dir)
    ledger = CostLedger(rk.ledger, cfg.cost.gpu_usd_per_hour)
    log_dir = Path(cfg.pipeline.server_log_dir or rd.path)
    start, stop_servers = _placement(cfg)
    with ledger.stage("serve_start", model=str(model_dir), placement=cfg.server.placement) as st:
        # server.replicas servers (on this node, or one per Ray actor on the cluster), started together; the eval
        # and pair building spread over all
        servers = start(cfg.server, model_dir, lambda i: log_dir / (
            f"gen_server-round-{k}.log" if i == 0 else f"gen_server-round-{k}-replica-{i}.log"))
        st.add(replicas=len(servers))
    srv = servers[0]
    try:
        if k == 0 and not state.done("round-0/base_check"):
            verdict, evidence = base_check(model_dir, server=srv.base_url, api_key=srv.api_key)
            for e in evidence:
                log.info("base check: [%s %+d] %s", e.points_to, e.score, e.reason)
            if verdict == "INSTRUCT" and not cfg.model.allow_instruct:
                raise PipelineError(f"{model_dir} looks like an INSTRUCT model (evidence above), not a base model. "
                                    f"This pipeline aligns base models; set model.allow_instruct=true to go on anyway.")
            _mark(state, "round-0/base_check", verdict=verdict)
        if not state.done(f"round-{k}/eval"):
            ev = cfg.eval
            with ledger.stage("eval", suite=ev.suite) as st:
                scores = run_eval(base_urls=[s.base_url for s in servers], model=None, api_key=srv.api_key,
                                  out_dir=rk.eval, **config_settings(cfg))
                st.add(completion_tokens=scores["completion_tokens"], prompts=scores["n_prompts"])
            log.info("round %d eval: %s=%.4f", k, ev.gate_metric, scores[ev.gate_metric])
            _mark(state, f"round-{k}/eval", **{m: scores[m] for m in ("prompt_strict", "prompt_loose",
                                                                     "instruction_strict", "instruction_loose")})
        stop = decide(cfg, rd, k)
        if stop is not None:
            return stop
        if not state.done(f"round-{k}/pairs"):
            cmd, env = pairs_command(cfg, cfg_path, k, [s.base_url for s in servers], srv.api_key,
                                     _cluster_jobs_url(cfg))
            _stage(cmd, f"round-{k}/pairs", env)
            stats_path = rk.pairs / ".meta" / "stats.json"
            stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
            _mark(state, f"round-{k}/pairs", kept=stats.get("kept"))
    finally:
        stop_servers(servers)  # every replica's process gone (on every node) before training takes the GPUs
    return _no_pairs(state, rk, k, model_dir)


def _no_pairs(state: RunState, rk: Any, k: int, model_dir: Path) -> tuple[str, str | None] | None:
    if state.info(f"round-{k}/pairs").get("kept") == 0:
        return (f"no pairs kept in round {k}: nothing to train on (drop reasons in {rk.pairs / 'README.md'}); "
                f"raise pairs.max_instructions or pairs.k", str(model_dir))
    return None


def _check_run_dir(path: Path) -> None:
    """The run directory can be made (nothing is created here: a config refused later leaves no trace)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError([f"run.root / run.name: cannot make the run directory {path}: {existing} is a file, not a "
                           "directory: choose another run.root"], "pipeline config")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError([f"run.root / run.name: cannot make the run directory {path}: {existing} is not writable: "
                           "choose another run.root"], "pipeline config")


def _has_weights(model_dir: Path) -> bool:
    """A saved model, not just its merge report: ``config.json`` and at least one safetensors file. A merged model
    is derived data (base + ``round-k/adapter``), so a run dir carried to another machine may leave it behind."""
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def run(cfg: Config) -> int:
    """Run (or continue) the loop until a stopping rule fires. Returns the process exit code."""
    from pipeline.plan import refuse_unless_fits
    from pipeline.report import write_report
    from pipeline.validate import validate_pipeline

    rd = RunDir.from_config(cfg)
    _check_run_dir(rd.path)
    try:
        base_dir = model_of_round(cfg, rd, 0)
    except (OSError, ValueError) as e:  # UnknownModelError, a packaged model that cannot be prepared
        raise ConfigError([f"model.base: {e}"], "pipeline config") from None
    refuse_unless_fits(cfg)  # cost.gpu: every stage priced; a stage that cannot fit the card stops the run here
    validate_pipeline(cfg, base_dir)
    _check_saved_config(rd, cfg)
    cfg_path = rd.config_path
    state = RunState(rd.path)
    if state.stopped:
        log.info("run already finished: %s", state.stopped["reason"])
        write_report(cfg, rd, state)
        return 0
    k = 0
    while True:
        t0 = time.time()
        stop = _serve_phase(cfg, rd, state, k, cfg_path)
        if stop is not None:
            reason, promoted = stop
            state.stop(reason, round=k, promoted=promoted)
            log.info("stopping after round %d: %s; final model: %s", k, reason, promoted)
            break
        if not state.done(f"round-{k}/train"):
            trainer = f"trainer.{cfg.train.method}"  # one recipe per method: trainer/dpo.py, trainer/sft.py
            rc = _stage([sys.executable, "-m", trainer, "--config", str(cfg_path), f"train.round={k}", "--resume"],
                        f"round-{k}/train", ok=(0, TRAIN_BUDGET_EXIT))
            if rc == TRAIN_BUDGET_EXIT:  # the trainer stopped cleanly at cost.budget_usd: a stop, not a failure
                j, promoted = _fallback(cfg, rd, k + 1, _measures(cfg, rd))
                reason = (f"budget spent: cost.budget_usd=${cfg.cost.budget_usd:.2f} reached while training round "
                          f"{k} (${rd.spent_usd():.2f} recorded); its partial adapter is not merged, round {j}'s "
                          f"model is kept")
                state.stop(reason, round=k, promoted=promoted)
                log.info("stopping in round %d: %s", k, reason)
                break
            _mark(state, f"round-{k}/train")
        merged = rd.round(k, create=False).merged
        if state.done(f"round-{k}/merge") and not _has_weights(merged):
            log.warning("round %d's merged model %s has no weights (a run dir copied without them?): merging "
                        "round-%d/adapter again", k, merged, k)
            del state.data["steps"][f"round-{k}/merge"]
        if not state.done(f"round-{k}/merge"):
            _stage([sys.executable, "-m", "trainer.merge", "--config", str(cfg_path), f"train.round={k}"],
                   f"round-{k}/merge")
            _mark(state, f"round-{k}/merge", model=str(rd.round(k, create=False).merged))
        log.info("round %d done in %.0fs", k, time.time() - t0)
        k += 1
    path = write_report(cfg, rd, state)
    print(f"report: {path}")
    print(f"final model: {state.stopped['promoted_model']}")
    return 0


def status(run_dir: Path) -> str:
    state = RunState(run_dir)
    if not state.path.exists():
        return f"{run_dir}: no run here yet (start it with `python -m pipeline run --config CFG`)"
    lines = [f"run {run_dir}"]
    for step, info in state.data["steps"].items():
        extra = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()
                          if k != "finished_at")
        lines.append(f"  done  {step:<22} {info['finished_at']}  {extra}")
    if state.stopped:
        lines.append(f"  stopped after round {state.stopped['round']}: {state.stopped['reason']}")
        lines.append(f"  final model: {state.stopped['promoted_model']}")
    else:
        lines.append("  not finished: `python -m pipeline run --config CFG` continues from the next step")
    return "\n".join(lines)



