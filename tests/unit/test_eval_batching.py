"""eval.run._fetch_all batching against a fake async client: grouping, chunking, the in-flight prompt bound,
choice order by index, exact usage totals, chat one per request, BadRequest naming the batch's first prompt."""

import asyncio
from types import SimpleNamespace

import httpx
import openai
import pytest

from eval import run
from eval.run import EvalError, EvalSettings, ResponseCache, _fetch_all, _request, _request_key
from shared.prompting import load_template


class FakeClient:
    """Answers each prompt with ``echo:<prompt>``; 3 completion tokens per prompt, 10 prompt tokens."""

    def __init__(self, reject: bool = False, delay: float = 0.01, fail_after: int | None = None) -> None:
        self.calls: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.reject, self.delay, self.fail_after = reject, delay, fail_after
        self.completions = SimpleNamespace(create=self._completions)
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._chat))

    async def _serve(self, body: dict, prompts: list[str], choice) -> SimpleNamespace:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:  # the server is gone
            raise openai.APIConnectionError(request=httpx.Request("POST", "http://x"))
        self.calls.append(body)
        self.in_flight += len(prompts)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.delay)
        self.in_flight -= len(prompts)
        if self.reject:
            response = httpx.Response(400, request=httpx.Request("POST", "http://x"))
            raise openai.BadRequestError("too long", response=response, body=None)
        choices = [choice(i, p) for i, p in enumerate(prompts)][::-1]  # out of order: the client sorts by index
        n = len(prompts)
        return SimpleNamespace(choices=choices, usage=SimpleNamespace(prompt_tokens=10 * n, completion_tokens=3 * n))

    async def _completions(self, **body) -> SimpleNamespace:
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        return await self._serve(body, prompts, lambda i, p: SimpleNamespace(index=i, text=f"echo:{p}",
                                                                             finish_reason="stop"))

    async def _chat(self, **body) -> SimpleNamespace:
        return await self._serve(body, [body["messages"][0]["content"]], lambda i, p: SimpleNamespace(
            index=i, message=SimpleNamespace(content=f"echo:{p}"), finish_reason="stop"))

    async def close(self) -> None:
        pass


def _fetch(tmp_path, monkeypatch, n_items: int, *, style: str = "base", concurrency: int = 16, ppr: int = 8,
           client: FakeClient | None = None, max_tokens=None, servers: dict[str, FakeClient] | None = None,
           stall_timeout: float = 600.0) -> tuple[FakeClient, ResponseCache, list[dict]]:
    """``servers``: a fake client per URL, for a fan-out (default: ``client`` at http://x)."""
    client = client or FakeClient()
    servers = servers or {"http://x": client}
    monkeypatch.setattr(run, "make_client", lambda url, *a, **k: servers[url])
    tpl = load_template()
    items = [{"key": f"k{i}", "prompt": f"p{i}"} for i in range(n_items)]
    reqs = []
    for i, it in enumerate(items):
        s = EvalSettings(prompt_style=style, max_tokens=max_tokens[i] if max_tokens else 16)
        req = _request(it, "m", s, tpl)
        req["request_key"] = _request_key(req)
        reqs.append(req)
    cache = ResponseCache(tmp_path, {"t": 1})
    asyncio.run(_fetch_all(items, reqs, cache, base_urls=list(servers), api_key=None, concurrency=concurrency,
                           timeout=1, max_retries=0, prompts_per_request=ppr,
                           stall_timeout=stall_timeout))
    return client, cache, reqs


def test_batches_keep_order_bound_and_exact_usage(tmp_path, monkeypatch):
    client, cache, reqs = _fetch(tmp_path, monkeypatch, 21, concurrency=12, ppr=8)
    assert sorted(len(c["prompt"]) if isinstance(c["prompt"], list) else 1 for c in client.calls) == [5, 8, 8]
    assert client.max_in_flight <= 12
    tpl = load_template()
    for i, r in enumerate(reqs):
        assert cache.entries[r["request_key"]]["response"] == f"echo:{tpl.render(f'p{i}')}"
        assert cache.entries[r["request_key"]]["key"] == f"k{i}"
    entries = list(cache.entries.values())
    assert sum(e["completion_tokens"] for e in entries) == 3 * 21 and sum(e["prompt_tokens"] for e in entries) == 210
    assert sorted(e["batch"] for e in entries) == [5] * 5 + [8] * 16
    on_disk = (tmp_path / "responses.jsonl").read_text().splitlines()
    assert len(on_disk) == 21


def test_only_identical_bodies_share_a_request_and_concurrency_caps_the_batch(tmp_path, monkeypatch):
    client, cache, _ = _fetch(tmp_path, monkeypatch, 6, ppr=8, max_tokens=[16, 16, 16, 32, 32, 16])
    assert sorted(len(c["prompt"]) for c in client.calls) == [2, 4]
    assert {c["max_tokens"] for c in client.calls if len(c["prompt"]) == 2} == {32}
    client, _, _ = _fetch(tmp_path / "b", monkeypatch, 5, ppr=8, concurrency=2)
    assert client.max_in_flight <= 2 and len(client.calls) == 3


def test_one_per_request_is_todays_body(tmp_path, monkeypatch):
    client, cache, _ = _fetch(tmp_path, monkeypatch, 3, ppr=1)
    assert [isinstance(c["prompt"], str) for c in client.calls] == [True] * 3
    assert {e["batch"] for e in cache.entries.values()} == {1}
    assert sum(e["completion_tokens"] for e in cache.entries.values()) == 9


def test_chat_is_one_prompt_per_request(tmp_path, monkeypatch):
    client, cache, _ = _fetch(tmp_path, monkeypatch, 4, style="chat", ppr=8)
    assert len(client.calls) == 4 and all("prompt" not in c for c in client.calls)
    assert sorted(e["response"] for e in cache.entries.values()) == [f"echo:p{i}" for i in range(4)]


def test_bad_request_names_the_first_prompt_of_the_batch(tmp_path, monkeypatch):
    with pytest.raises(EvalError, match=r"rejected a request of 3 prompts \(the first 'k0'\).*--prompts-per-request 1"):
        _fetch(tmp_path, monkeypatch, 3, client=FakeClient(reject=True))
    with pytest.raises(EvalError, match=r"rejected prompt 'k0': too long"):
        _fetch(tmp_path / "b", monkeypatch, 1, client=FakeClient(reject=True))


def _once_each(cache: ResponseCache, reqs: list[dict]) -> list[dict]:
    """Every request answered, each exactly once on disk; the entries as written."""
    import json

    rows = [json.loads(x) for x in (cache.path).read_text().splitlines()]
    assert sorted(r["request_key"] for r in rows) == sorted(r["request_key"] for r in reqs)
    return rows


def test_fan_out_gives_the_faster_server_more(tmp_path, monkeypatch):
    """Servers pull from one queue as their slots free up: not round-robin, and never over ``concurrency`` each."""
    fast, slow = FakeClient(delay=0.005), FakeClient(delay=0.05)
    _, cache, reqs = _fetch(tmp_path, monkeypatch, 40, ppr=1, concurrency=2, servers={"http://a": fast, "http://b": slow})
    rows = _once_each(cache, reqs)
    assert len(fast.calls) > 3 * len(slow.calls) > 0 and fast.max_in_flight <= 2 and slow.max_in_flight <= 2
    assert {r["server"] for r in rows} == {"http://a", "http://b"}


def test_a_lost_server_hands_its_prompts_to_the_others(tmp_path, monkeypatch, caplog):
    """A server whose requests fail after their retries is dropped with a warning; its prompts (the failed one and
    the others in flight) are answered by the server left, each once."""
    dying, ok = FakeClient(fail_after=3), FakeClient()
    _, cache, reqs = _fetch(tmp_path, monkeypatch, 20, ppr=2, concurrency=4,
                            servers={"http://dying": dying, "http://ok": ok})
    rows = _once_each(cache, reqs)
    # its 4th request failed; one begun before it may have been in flight then: cancelled, and asked of http://ok
    assert len(dying.calls) == 3 and 0 < sum(r["server"] == "http://dying" for r in rows) <= 6
    assert "dropping http://dying" in caplog.text and "http://ok" in caplog.text


def test_a_stalled_server_is_dropped_and_its_prompts_redone(tmp_path, monkeypatch, caplog):
    hung, ok = FakeClient(delay=3600), FakeClient()
    _, cache, reqs = _fetch(tmp_path, monkeypatch, 12, ppr=1, concurrency=3, stall_timeout=0.4,
                            servers={"http://hung": hung, "http://ok": ok})
    rows = _once_each(cache, reqs)
    assert {r["server"] for r in rows} == {"http://ok"} and len(hung.calls) == 3
    assert "dropping http://hung: no response from the server at http://hung for 0.4 s" in caplog.text


def test_only_the_loss_of_every_server_fails_the_eval(tmp_path, monkeypatch):
    with pytest.raises(EvalError, match=r"all 2 servers are lost; the last: the server at http://\w failed after 0 "
                                        r"retries \(APIConnectionError.*The 2 responses so far are kept"):
        _fetch(tmp_path, monkeypatch, 10, ppr=1, concurrency=1,
               servers={"http://a": FakeClient(fail_after=1), "http://b": FakeClient(fail_after=1)})
    with pytest.raises(EvalError, match=r"^the server at http://a failed after 0 retries"):
        _fetch(tmp_path / "b", monkeypatch, 3, ppr=1, servers={"http://a": FakeClient(fail_after=0)})


def test_config_field():
    from shared.config import ConfigError, load_config

    assert load_config().eval.prompts_per_request == 8
    assert load_config(None, ["eval.prompts_per_request=1"]).eval.prompts_per_request == 1
    with pytest.raises(ConfigError, match="eval.prompts_per_request"):
        load_config(None, ["eval.prompts_per_request=0"])


def test_base_answers_end_where_the_model_starts_another_turn(tmp_path, monkeypatch):
    """The eval scores an answer up to an invented next turn (as pair building cuts it) and counts it finished."""
    import json

    class RunOn(FakeClient):
        async def _completions(self, **body):
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            return await self._serve(body, prompts, lambda i, p: SimpleNamespace(
                index=i, text="the capital of france is paris.\n# Question: What is 2+2?\n# Answer: 4 4 4",
                finish_reason="length"))

    suite = tmp_path / "suite.jsonl"
    suite.write_text(json.dumps({"key": "a", "prompt": "Name the capital of France. Answer in lowercase letters.",
                                 "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}) + "\n")
    monkeypatch.setattr(run, "make_client", lambda *a, **k: RunOn())
    monkeypatch.setattr(run, "wait_for_health", lambda *a, **k: None)
    monkeypatch.setattr(run, "served_models", lambda *a, **k: [{"id": "m"}])
    scores = run.run_eval(base_url="http://x", model=None, api_key=None, suite=str(suite), out_dir=tmp_path / "out",
                          prompts_per_request=1)
    row = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    assert row["response"] == "the capital of france is paris." and row["finish_reason"] == "stop"
    assert row["prompt_strict"]  # the run-on's capitalised "Question"/"What" would have failed lowercase
    assert scores["cut_at_new_turn"] == 1 and scores["truncated"] == 0


@pytest.mark.parametrize("flag,value", [("--limit", "0"), ("--concurrency", "0"), ("--max-tokens", "0"),
                                        ("--prompts-per-request", "0"), ("--limit", "-3")])
def test_cli_zero_or_negative_counts_are_refused_before_anything(tmp_path, capsys, flag, value):
    from eval.__main__ import main

    out = tmp_path / "out"
    rc = main(["--server", "http://127.0.0.1:9", "--out", str(out), flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and f"must be >= 1, got {value}" in err and "Traceback" not in err
    assert not out.exists()  # nothing written: the corrected rerun into the same --out starts clean


def test_a_cache_without_responses_takes_new_settings(tmp_path):
    ResponseCache(tmp_path, {"max_tokens": 0})  # an eval that failed before its first response
    cache = ResponseCache(tmp_path, {"max_tokens": 64})
    cache.add({"request_key": "a", "response": "x"})
    cache.flush()
    with pytest.raises(EvalError, match="holds responses of another eval"):
        ResponseCache(tmp_path, {"max_tokens": 128})


def test_cli_servers_repeat_or_comma_list():
    from eval.__main__ import _servers
    from eval.run import _server_urls

    assert _servers(["http://a:1,http://b:2", " http://c:3 "]) == ["http://a:1", "http://b:2", "http://c:3"]
    assert _server_urls("http://a:1/v1", ["http://a:1", "http://b:2/"]) == ["http://a:1", "http://b:2"]
    with pytest.raises(EvalError, match="no server"):
        _server_urls(None, [])
