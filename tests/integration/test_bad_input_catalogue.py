"""The bad-input catalogue (docs/reliability.md): each case through the real command line. Every one must give a
non-zero exit, a line naming the problem and the fix, and no traceback; cases with outputs keep them intact.

The doc lists every case by its id and the phrase its message holds; a test keeps the two in step."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gen_server.process import ServerProcess, free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the bad input, as the doc names it
    argv: Callable[[Path, Path], list[str]]  # (tmp dir, tiny model dir) -> `python -m ...` arguments
    phrase: str  # what the message says (regex)
    code: int | None = None  # the exit code, when the command documents one


def _w(p: Path, text: str | bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    return p


def _model_copy(t: Path, model: Path, name: str, damage: Callable[[Path], None]) -> str:
    d = t / name
    shutil.copytree(model, d)
    damage(d)
    return str(d)


def _pairs(t: Path, rows: list[dict]) -> Path:
    import pandas as pd

    d = t / "pairs"
    d.mkdir()
    pd.DataFrame(rows).to_parquet(d / "shard-00000.parquet")
    return d


def _row(i: int, **kw) -> dict:
    from shared.prompting import load_template

    return {"id": f"id{i}", "prompt": load_template().render(f"Say {i}."), "chosen": f"{i} it is.",
            "rejected": "No.", "instruction_id": f"i{i}", "constraints": "[]", "principle_id": "p",
            "chosen_passed": 1, "rejected_passed": 0, "model": "m", "round": 0, **kw}


PIPE = ["pipeline", "run", "--config", "configs/demo-cpu.yaml"]


def _pipe(t: Path, *ov: str) -> list[str]:
    return [*PIPE, f"run.root={t / 'runs'}", *ov]


CASES = [
    # configs
    Case("config-missing", "a --config file that does not exist",
         lambda t, m: [*PIPE[:3], str(t / "nope.yaml")], r"file not found: .*nope\.yaml", 2),
    Case("config-not-yaml", "a config that is not valid YAML",
         lambda t, m: [*PIPE[:3], str(_w(t / "c.yaml", "pairs: [k: 2\n"))], "not valid YAML", 2),
    Case("config-empty", "an empty (or comments-only) config",
         lambda t, m: [*PIPE[:3], str(_w(t / "c.yaml", "# nothing\n"))], "the file is empty", 2),
    Case("config-duplicate-section", "a section given twice",
         lambda t, m: [*PIPE[:3], str(_w(t / "c.yaml", "pairs:\n  k: 2\npairs:\n  k: 3\n"))],
         r"'pairs' is given twice \(lines 1 and 3\)", 2),
    Case("config-binary", "a binary file as config",
         lambda t, m: [*PIPE[:3], str(_w(t / "c.yaml", b"\xff\xfe\x00\x01"))], "not a text", 2),
    Case("config-unknown-key", "a key no section has (a typo)",
         lambda t, m: _pipe(t, "pairs.kk=3"), r"pairs\.kk: unknown key .*docs/config.md", 2),
    Case("config-wrong-type", "a value of the wrong type",
         lambda t, m: _pipe(t, "pairs.k=many"), r"pairs\.k: Input should be a valid integer", 2),
    Case("override-malformed", "an override not of the form a.b=c",
         lambda t, m: _pipe(t, "pairs.k"), "expected the form section.key=value", 2),
    Case("run-name-escapes", "a run.name that leaves run.root", lambda t, m: _pipe(t, "run.name=../x"), "run.name", 2),
    Case("dedupe-threshold", "pairs.dedupe_threshold above what MinHash resolves",
         lambda t, m: _pipe(t, "pairs.dedupe_threshold=0.99"), r"less than or equal to 0\.95", 2),
    Case("heldout-unknown", "an eval.heldout_types entry that is no IFEval id",
         lambda t, m: _pipe(t, "eval.heldout_types=[keywords:nonsense]"), "is not an instruction id", 2),
    Case("one-candidate", "pairs.k and pairs.revisions that give one candidate",
         lambda t, m: _pipe(t, "pairs.k=1", "pairs.revisions=0"), "gives one candidate; a pair needs two", 2),
    Case("template-broken", "model.template pointing at broken YAML",
         lambda t, m: _pipe(t, "model.template=" + str(_w(t / "tpl.yaml", "a: [\n"))),
         "not a valid YAML prompt template at line", 2),
    # constitution files
    Case("constitution-missing", "pairs.constitution that does not exist",
         lambda t, m: _pipe(t, f"pairs.constitution={t / 'none'}"), "constitution: ", 2),
    Case("principle-broken", "a principle file that is not valid YAML",
         lambda t, m: _pipe(t, f"pairs.constitution={_w(t / 'p' / 'a.yaml', 'id: [x').parent}"),
         r"constitution: .*a\.yaml", 2),
    # instruction files
    Case("instructions-missing", "pairs.input_file that does not exist",
         lambda t, m: _pipe(t, "pairs.sources=[file]", f"pairs.input_file={t / 'none.jsonl'}"), "does not exist", 2),
    Case("instructions-empty", "an empty pairs.input_file",
         lambda t, m: _pipe(t, "pairs.sources=[file]", f"pairs.input_file={_w(t / 'i.jsonl', '')}"),
         "holds no instructions", 2),
    Case("instructions-bad-json", "a pairs.input_file line that is not JSON",
         lambda t, m: _pipe(t, "pairs.sources=[file]", "pairs.input_file=" + str(_w(t / "i.jsonl", '{"a": \n'))),
         r"1 bad line\(s\)", 2),
    Case("instructions-no-text", "a pairs.input_file row without an instruction",
         lambda t, m: _pipe(t, "pairs.sources=[file]",
                            f"pairs.input_file={_w(t / 'i.jsonl', json.dumps({'instruction': ''}) + chr(10))}"),
         "needs a non-empty 'instruction' or 'task'", 2),
    # pair datasets
    Case("pairs-dir-missing", "train.pairs_dir that does not exist",
         lambda t, m: ["trainer.data", f"model.base={m}", f"train.pairs_dir={t / 'none'}"], "pairs dir not found", 2),
    Case("pairs-dir-empty", "a pairs dir with no shards",
         lambda t, m: ["trainer.data", f"model.base={m}", f"train.pairs_dir={(t / 'e').mkdir() or t / 'e'}"],
         r"no \*\.parquet shards", 2),
    Case("pairs-identical", "pairs whose chosen and rejected are the same",
         lambda t, m: ["trainer.data", f"model.base={m}",
                       f"train.pairs_dir={_pairs(t, [_row(0), _row(1, rejected='1 it is.')])}"],
         r"identical .*chosen == rejected", 1),
    # model dirs
    Case("model-unknown", "a model.base that is neither a dir nor a packaged name",
         lambda t, m: _pipe(t, "model.base=nonesuch"), "is neither an existing model directory", 2),
    Case("model-config-corrupt", "a model dir whose config.json is not JSON",
         lambda t, m: ["gen_server", "--backend", "embedded", "--model",
                       _model_copy(t, m, "mc", lambda d: (d / "config.json").write_text("{oops"))],
         r"config\.json is not valid JSON", 2),
    Case("model-no-weights", "a model dir without weights",
         lambda t, m: ["gen_server", "--backend", "embedded", "--model",
                       _model_copy(t, m, "mw", lambda d: [f.unlink() for f in d.glob("*.safetensors")])],
         "has no weights", 2),
    Case("model-no-tokenizer", "a model dir without tokenizer files",
         lambda t, m: ["gen_server", "--backend", "embedded", "--model",
                       _model_copy(t, m, "mt", lambda d: [f.unlink() for f in d.glob("tokenizer*")])],
         "has no tokenizer files", 2),
    Case("max-model-len", "--max-model-len past the model's positions",
         lambda t, m: ["gen_server", "--backend", "embedded", "--model", str(m), "--max-model-len", "999999"],
         "exceeds the model's 2048 positions", 2),
    # eval files
    Case("compare-missing", "eval compare on a dir with no results",
         lambda t, m: ["eval", "compare", str(t), str(t)], r"results\.jsonl not found", 2),
    Case("compare-corrupt", "eval compare on a corrupt results file",
         lambda t, m: ["eval", "compare", str(_w(t / "ev" / "results.jsonl", "{}" + chr(10) + "xx").parent),
                       str(t / "ev")],
         r"results\.jsonl: 1 bad line", 2),
    Case("eval-suite-missing", "eval --suite naming a file that does not exist",
         lambda t, m: ["eval", "--suite", str(t / "none.jsonl"), "--out", str(t / "o")], r"none\.jsonl", 2),
    Case("eval-limit-zero", "eval --limit 0", lambda t, m: ["eval", "--limit", "0", "--out", str(t / "o")],
         "limit must be >= 1, got 0", 2),
    # run dirs
    Case("run-root-file", "a run.root that is a file", lambda t, m: _pipe(t, f"run.root={_w(t / 'f', 'x')}"),
         r"cannot make the run directory .*is a file, not a directory", 2),
    Case("status-no-run", "pipeline status on a dir that holds no run", lambda t, m: ["pipeline", "status", str(t)],
         "no run here yet", 1),
    # CLI flags
    Case("port-range", "gen_server --port out of range",
         lambda t, m: ["gen_server", "--model", str(m), "--port", "70000"], r"--port must be <= 65535, got 70000", 2),
    Case("public-bind-no-key", "gen_server on a public --host without an API key",
         lambda t, m: ["gen_server", "--model", str(m), "--host", "0.0.0.0"], "pass --allow-insecure", 2),
    Case("backend-flag-mismatch", "a vLLM-only flag with the embedded backend",
         lambda t, m: ["gen_server", "--backend", "embedded", "--model", str(m), "--quantization", "fp8"],
         "only apply to --backend vllm", 2),
]


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if k != "GEN_SERVER_API_KEY"}
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env, **kw)


def _check(r: subprocess.CompletedProcess, phrase: str, code: int | None) -> None:
    out = r.stderr + r.stdout
    assert "Traceback" not in out, out[-3000:]
    assert re.search(phrase, out), out[-3000:]
    assert any(re.search(phrase, line) for line in out.splitlines()), "the message is not on one line"
    if code is None:
        return
    assert r.returncode == code, (r.returncode, out[-2000:])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, tiny_model_dir):
    r = _run(case.argv(tmp_path, tiny_model_dir))
    if case.code is not None:
        assert r.returncode != 0
    _check(r, case.phrase, case.code)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("state.json"))  # nothing started


# server replies: a dead server, a wrong key, a server that fails every completion
SERVER_CASES = {
    "server-dead": ("a --server where nothing listens", "no healthy generation server at", 2),
    "server-wrong-key": ("a key the server does not accept", r"rejected the API key \(HTTP 401\)", 2),
    "server-5xx": ("a server answering 5xx to every completion", r"failed after 0 retries \(InternalServerError", 2),
}


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(tiny_model_dir, served_model_name="tiny", log_path=tmp_path_factory.mktemp("s") / "s.log",
                       health_timeout=120) as srv:
        yield srv


def test_server_replies(tmp_path, keyed_server):
    from tests.integration.test_faults import Sim

    base = ["eval", "--suite", "own", "--limit", "2", "--max-tokens", "4", "client.max_retries=0"]
    r = _run([*base, "--server", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "a")])
    _check(r, SERVER_CASES["server-dead"][1], 2)
    r = _run([*base, "--server", keyed_server.base_url, "--api-key", "wrong", "--out", str(tmp_path / "b")])
    _check(r, SERVER_CASES["server-wrong-key"][1], 2)
    sim = Sim(free_port(), "--fault", "error")
    try:
        r = _run([*base, "--server", sim.url, "--out", str(tmp_path / "c")])
        _check(r, SERVER_CASES["server-5xx"][1], 2)
    finally:
        sim.stop()


def test_the_doc_lists_every_case():
    doc = (REPO / "docs" / "reliability.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in doc] + [k for k in SERVER_CASES if f"`{k}`" not in doc]
    assert not missing, f"docs/reliability.md does not list {missing}"
    assert len(CASES) + len(SERVER_CASES) >= 30
