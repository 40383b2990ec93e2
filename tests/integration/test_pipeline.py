"""The whole loop with small numbers: the real embedded server, real Ray (in-process, inside pair_builder),
real DPO steps, a real merge, real evals - killed at two different steps and continued; and a config whose
parts disagree, rejected before anything starts."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from tests.tiny import write_pair_assets

pytestmark = pytest.mark.integration

INSTRUCTIONS = [f"{v} {t}." for v in ("Describe", "Write a haiku about", "List facts about")
                for t in ("rain", "snow", "the sea", "a cat", "a dog", "city lights")]


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    write_pair_assets(tmp_path, INSTRUCTIONS)  # the tiny model's random text needs these to keep pairs
    cfg = {
        "run": {"name": "it", "root": str(tmp_path / "runs")},
        "model": {"base": str(tiny_model_dir), "template": str(tmp_path / "template.yaml")},
        "server": {"backend": "embedded", "max_model_len": 2048},
        "eval": {"limit": 6, "max_tokens": 12, "concurrency": 6},
        "pairs": {"sources": ["file"], "input_file": str(tmp_path / "instructions.jsonl"),
                  "constitution": str(tmp_path / "principles"), "no_constraint_rule": "prefer_rewrite",
                  "max_length_ratio": 1000, "min_edit_distance": 0, "max_tokens": 12, "critique_max_tokens": 12,
                  # random text shares no word with its task: the real-model quality filters would drop every pair
                  "max_edit_distance": 1.0, "min_task_overlap": None,
                  "progress": False},
        "train": {"backend": "peft", "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 2,
                  "gradient_accumulation_steps": 1, "lora_r": 8, "max_length": 1100, "eval_split": 0.0,
                  "report_to": [], "learning_rate": 1e-3},
        "pipeline": {"rounds": 1, "min_gain": 0.0},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p, tmp_path / "runs" / "it"


def _pipeline(*args, crash_after=None, timeout=900):
    env = {**os.environ}
    env.pop("SELFALIGN_PIPELINE_CRASH_AFTER", None)
    if crash_after:
        env["SELFALIGN_PIPELINE_CRASH_AFTER"] = crash_after
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _servers(model_dir) -> set[int]:
    """pids of gen_server processes serving ``model_dir``."""
    pids = set()
    for d in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"gen_server" in cmd and str(model_dir).encode() in cmd:
            pids.add(int(d))
    return pids


def _no_new_servers(before: set[int], model_dir, wait: float = 15.0) -> set[int]:
    deadline = time.monotonic() + wait
    while (left := _servers(model_dir) - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_round_killed_twice_then_finished(tiny_config, tiny_model_dir):
    cfg, run = tiny_config
    before = _servers(tiny_model_dir)
    r = _pipeline("run", "--config", str(cfg), crash_after="round-0/eval")
    assert r.returncode == 137, r.stderr[-3000:]
    # the pipeline died mid-phase (no finally ran): its server must not outlive it
    assert not _no_new_servers(before, tiny_model_dir)
    state = json.loads((run / "state.json").read_text())
    assert list(state["steps"]) == ["round-0/base_check", "round-0/eval"]
    eval_done_at = state["steps"]["round-0/eval"]["finished_at"]
    cached = (run / "round-0" / "eval" / "responses.jsonl").read_text()

    r = _pipeline("run", "--config", str(cfg), crash_after="round-0/train")
    assert r.returncode == 137, r.stderr[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert state["steps"]["round-0/eval"]["finished_at"] == eval_done_at  # not redone
    assert "round-0/pairs" in state["steps"] and "round-0/train" in state["steps"]
    assert "round-0/merge" not in state["steps"]

    r = _pipeline("run", "--config", str(cfg), crash_after="round-0/merge")
    assert r.returncode == 137, r.stderr[-3000:]
    # the run dir carried to another machine without its weights (bench/collect_run.sh keeps the adapters and
    # the merge report): the next run merges round 0 again from its adapter, then goes on
    merged = run / "round-0" / "merged"
    for f in merged.iterdir():
        if f.name != "merge_report.json":
            f.unlink() if f.is_file() else shutil.rmtree(f)
    r = _pipeline("run", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "merging round-0/adapter again" in r.stderr
    state = json.loads((run / "state.json").read_text())
    assert state["stopped"] is not None, state
    assert (run / "round-0" / "eval" / "responses.jsonl").read_text() == cached
    assert state["steps"]["round-0/pairs"]["kept"] >= 6
    assert (run / "round-0" / "merged" / "config.json").exists()
    assert (run / "round-1" / "eval" / "scores.json").exists()
    # round 1's eval decides: max rounds, a plateau or a regression (the tiny model is random either way)
    assert state["stopped"]["round"] == 1
    assert state["stopped"]["promoted_model"] in (str(run / "round-0" / "merged"), str(tiny_model_dir))
    md = (run / "report.md").read_text()
    assert "## Scores by round" in md and "## Resolved config" in md and "## Time and cost" in md
    assert "data:image/png;base64," in (run / "report.html").read_text()

    r = _pipeline("status", str(run))
    assert r.returncode == 0 and "stopped after round" in r.stdout
    # finished: running again does nothing but rewrite the report
    r = _pipeline("run", "--config", str(cfg))
    assert r.returncode == 0 and "already finished" in r.stderr


def test_disagreeing_config_is_rejected_before_anything_starts(tiny_config):
    cfg, run = tiny_config
    r = _pipeline("run", "--config", str(cfg), "train.base_model=/somewhere/else", "train.max_length=64",
                  "pairs.servers=[http://127.0.0.1:1]", timeout=120)
    assert r.returncode == 2
    for needle in ("train.base_model", "train.max_length=64", "pairs.servers"):
        assert needle in r.stderr, r.stderr
    assert not run.exists()


def test_demo_config_end_to_end_with_small_numbers(tmp_path):
    """configs/demo-cpu.yaml itself (the packaged SmolLM2-135M), shrunk: eval subset, a few instructions, two
    DPO steps. With so few instructions the round may keep no pair; then it must stop saying so."""
    cfg = yaml.safe_load(open("configs/demo-cpu.yaml"))
    cfg["run"] = {"name": "demo-small", "root": str(tmp_path / "runs")}
    cfg["eval"].update(limit=6, max_tokens=64)
    cfg["pairs"].update(max_instructions=12, max_tokens=96, critique_max_tokens=64, progress=False)
    cfg["train"].update(max_steps=2, save_steps=1)
    p = tmp_path / "demo.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = _pipeline("run", "--config", str(p), timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "demo-small"
    state = json.loads((run / "state.json").read_text())
    assert state["steps"]["round-0/base_check"]["verdict"] == "INSTRUCT"  # allowed by the demo config
    kept = state["steps"]["round-0/pairs"]["kept"]
    if kept:
        assert (run / "round-0" / "merged" / "config.json").exists()
        assert (run / "round-1" / "eval" / "scores.json").exists()
        assert state["stopped"]["round"] == 1
    else:
        assert state["stopped"]["reason"].startswith("no pairs kept")
    assert (run / "report.html").exists()


def _pids_with(marker: bytes) -> dict[int, int]:
    """pid -> process group of every process whose command line holds ``marker``."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
            if marker in cmd:
                out[int(d)] = os.getpgid(int(d))
        except (OSError, ProcessLookupError):
            continue
    return out


def _group_members(pgid: int) -> list[int]:
    members = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid:
                    members.append(int(d))
            except (OSError, ProcessLookupError):
                pass
    return members


def test_sigterm_mid_pairs_leaves_nothing_running_and_the_rerun_finishes(tiny_config, tiny_model_dir):
    """SIGTERM to `pipeline run` while pair_builder (with its own local Ray) runs: the pipeline exits 143, and
    neither its server nor anything of the pair_builder stage's process group (Ray's agents included) is left."""
    import signal

    cfg, run = tiny_config
    before = _servers(tiny_model_dir)
    env = {**os.environ}
    env.pop("SELFALIGN_PIPELINE_CRASH_AFTER", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, stage = time.monotonic() + 600, {}
        while not stage and time.monotonic() < deadline and proc.poll() is None:
            stage = {pid: g for pid, g in _pids_with(b"pair_builder").items() if pid != os.getpid()}
            time.sleep(0.5)
        assert stage, "pair_builder never started: " + (proc.stderr.read()[-2000:] if proc.poll() is not None else "")
        time.sleep(8)  # its local Ray is up (agents started) by now, or nearly
        groups = set(stage.values())
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 143, err[-3000:]
    assert "interrupted: stopping it" in err
    assert not _no_new_servers(before, tiny_model_dir)
    deadline = time.monotonic() + 30  # processes reaped on a loaded 2-core machine
    while (left := [p for g in groups for p in _group_members(g)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the pairs stage outlived the pipeline: {left}"
    r = _pipeline("run", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "state.json").read_text())["stopped"] is not None


def test_budget_reached_while_training_is_a_stop_not_a_failure(tiny_config):
    """The trainer stops cleanly at cost.budget_usd (exit 3): the pipeline records a budget stop, keeps round 0's
    model and exits 0; it does not report a failed step."""
    cfg, run = tiny_config
    r = _pipeline("run", "--config", str(cfg), "cost.gpu_usd_per_hour=3600", crash_after="round-0/pairs")
    assert r.returncode == 137, r.stderr[-3000:]
    spent = sum(json.loads(x).get("cost_usd", 0) for x in (run / "round-0" / "ledger.jsonl").read_text().splitlines())
    assert spent > 0
    # what is left buys far less than one training step at $1/s
    r = _pipeline("run", "--config", str(cfg), "cost.gpu_usd_per_hour=3600", f"cost.budget_usd={spent + 0.01}")
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert state["stopped"]["reason"].startswith("budget spent: cost.budget_usd=") and "while training round 0" in \
        state["stopped"]["reason"]
    assert state["stopped"]["promoted_model"] and "round-0/train" not in state["steps"]
    assert "failed with exit code" not in r.stderr


def test_train_method_sft_runs_the_sft_recipe_through_the_round(tiny_config):
    """``train.method=sft``: the pipeline runs ``python -m trainer.sft`` on the round's pairs; its adapter is merged
    and the merge evaluated as DPO's would be."""
    cfg, run = tiny_config
    r = _pipeline("run", "--config", str(cfg), "train.method=sft")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "-m trainer.sft" in r.stderr and "-m trainer.dpo" not in r.stderr
    train = [json.loads(x) for x in (run / "round-0" / "ledger.jsonl").read_text().splitlines()
             if json.loads(x)["stage"] == "train"]
    assert [(e["method"], e["steps"]) for e in train] == [("sft", 4)]
    summary = json.loads((run / "round-0" / "adapter" / "train_summary.json").read_text())
    assert summary["method"] == "sft" and summary["train_pairs"] >= 1
    assert (run / "round-0" / "merged" / "merge_report.json").exists()
    assert (run / "round-1" / "eval" / "scores.json").exists()


def test_two_replicas_share_the_pair_building_and_stop_together(tiny_config, tiny_model_dir):
    """server.replicas=2: two servers start together (one key), pair_builder is given both URLs and sends work to
    each, and so does the eval, and both stop when the phase ends."""
    cfg, run = tiny_config
    before = _servers(tiny_model_dir)
    r = _pipeline("run", "--config", str(cfg), "server.replicas=2", crash_after="round-0/pairs")
    assert r.returncode == 137, r.stderr[-3000:]
    assert not _no_new_servers(before, tiny_model_dir)
    ledger = [json.loads(x) for x in (run / "round-0" / "ledger.jsonl").read_text().splitlines()]
    assert [e.get("replicas") for e in ledger if e["stage"] == "serve_start"] == [2]
    stats = json.loads((run / "round-0" / "pairs" / ".meta" / "stats.json").read_text())
    assert len(stats["run"]["servers"].split(", ")) == 2
    logs = [run / "gen_server-round-0.log", run / "gen_server-round-0-replica-1.log"]
    posts = [log.read_text().count("POST /v1/completions") for log in logs]
    assert all(n > 0 for n in posts), posts
