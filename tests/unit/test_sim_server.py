"""The simulated server (bench/sim_server.py) answers pair_builder's requests the way gen_server does."""

import importlib.util
import json
from pathlib import Path

from fastapi.testclient import TestClient

from pair_builder.critique import parse_verdict
from pair_builder.refscore import completion_logprobs

_spec = importlib.util.spec_from_file_location("sim_server", Path(__file__).parents[2] / "bench" / "sim_server.py")
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)


def _client(tmp_path: Path) -> TestClient:
    app = sim.create_app(tokens_per_s=1e6, latency_ms=0, max_concurrency=4, log_requests=tmp_path / "req.jsonl")
    return TestClient(app)


def test_models_and_sampling_are_deterministic(tmp_path):
    c = _client(tmp_path)
    assert c.get("/health").status_code == 200
    assert c.get("/v1/models").json()["data"][0]["root"] == sim.ROOT
    body = {"model": "sim", "prompt": "# Query:\nHi\n\n# Answer:\n", "n": 3, "max_tokens": 40, "seed": 7,
            "stop": ["\n# Query:"]}
    r1, r2 = c.post("/v1/completions", json=body).json(), c.post("/v1/completions", json=body).json()
    assert r1["choices"] == r2["choices"] and len(r1["choices"]) == 3
    lengths = [len(ch["text"].split()) for ch in r1["choices"]]
    assert all(10 <= n <= 30 for n in lengths) and len({ch["text"] for ch in r1["choices"]}) == 3
    assert r1["usage"]["completion_tokens"] == sum(lengths)
    crit = c.post("/v1/completions", json={**body, "n": 1, "prompt": "page\n\n# Critique:\n"}).json()
    assert parse_verdict(crit["choices"][0]["text"]) == "needs revision"
    stats = c.get("/stats").json()
    assert stats["requests"] == 3 and stats["completion_tokens"] == 2 * sum(lengths) + crit["usage"]["completion_tokens"]
    assert len((tmp_path / "req.jsonl").read_text().splitlines()) == 3
    c.post("/reset")
    assert c.get("/stats").json()["requests"] == 0 and (tmp_path / "req.jsonl").read_text() == ""


def test_echo_scoring_with_token_ids(tmp_path):
    c = _client(tmp_path)
    prompt = "# Query:\nHi there\n\n# Answer:\n"
    r = c.post("/v1/completions", json={"model": "sim", "prompt": [prompt, prompt + "hello you<eos>", prompt + "bye<eos>"],
                                         "max_tokens": 0, "echo": True, "logprobs": 1,
                                         "return_tokens_as_token_ids": True}).json()
    lps = [ch["logprobs"] for ch in r["choices"]]
    assert all(t.startswith("token_id:") for lp in lps for t in lp["tokens"])
    assert all(lp["token_logprobs"][0] is None for lp in lps)
    assert lps[1]["text_offset"][-2:] == [len(prompt), len(prompt) + 6]
    lc, lr = completion_logprobs(lps[0]["tokens"], [(lp["tokens"], lp["token_logprobs"]) for lp in lps[1:]])
    assert lc.tokens == 2 and lr.tokens == 1 and lc.logp < 0
    # a single-prompt scoring request is a probe: answered, not counted
    c.post("/v1/completions", json={"model": "sim", "prompt": "Hello world", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert c.get("/stats").json()["requests"] == 1
    assert json.loads((tmp_path / "req.jsonl").read_text())["max_tokens"] == 0
