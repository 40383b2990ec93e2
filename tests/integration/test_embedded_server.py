"""The embedded server as users run it: a real `python -m gen_server --backend embedded` subprocess on a free
loopback port, spoken to with the `openai` client and raw httpx."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key"
MODEL = "tiny"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(model_dir: Path, log_path: Path, *extra: str):
    """Start the server, wait for /health; yields its base URL and stops it however the tests end."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "gen_server", "--backend", "embedded", "--model", str(model_dir), "--port", str(port),
        "--api-key", KEY, "--served-model-name", MODEL, "--max-batch-size", "8", "--log-level", "warning", *extra,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy within 60 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def base_url(tiny_model_dir, tmp_path_factory):
    yield from _start_server(tiny_model_dir, tmp_path_factory.mktemp("server") / "base.log")


@pytest.fixture(scope="module")
def chat_base_url(tiny_chat_model_dir, tmp_path_factory):
    yield from _start_server(tiny_chat_model_dir, tmp_path_factory.mktemp("server") / "chat.log")


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_health_needs_no_key(base_url):
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_models_list(client):
    [model] = client.models.list().data
    assert model.id == MODEL
    assert model.model_extra["max_model_len"] == 2048


def test_completion_string_prompt(client):
    out = client.completions.create(model=MODEL, prompt="Write a poem", max_tokens=5, temperature=0)
    assert out.object == "text_completion"
    [choice] = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5


def test_completion_list_prompt_with_n(client):
    prompts = ["Write a poem", "The quick brown fox"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, n=2, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    # Prompt-major and greedy: both choices of a prompt agree, and match that prompt sent alone.
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0).choices[0].text for p in prompts]
    assert [c.text for c in out.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert out.usage.completion_tokens == 16
    single = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=0)
    assert out.usage.prompt_tokens == single.usage.prompt_tokens + client.completions.create(
        model=MODEL, prompt=prompts[1], max_tokens=0
    ).usage.prompt_tokens


def test_token_id_prompts_match_text_prompts(client, tiny_model_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("Write a poem")["input_ids"]
    by_text = client.completions.create(model=MODEL, prompt="Write a poem", temperature=0)
    assert by_text.usage.completion_tokens == 16  # the default max_tokens
    by_ids = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=16, temperature=0)
    assert [c.index for c in by_ids.choices] == [0, 1]
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids) + 2 and by_text.usage.prompt_tokens == len(ids)


def test_echo_logprobs_scores_text(client):
    text = "# Query: List three colors.\n# Answer: Red, green and blue."
    out = client.completions.create(
        model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1, extra_body={"prompt_logprobs": 1}
    )
    [choice] = out.choices
    assert choice.text == text
    lp = choice.logprobs
    assert "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and len(lp.text_offset) == len(lp.tokens) == out.usage.prompt_tokens
    assert out.usage.completion_tokens == 0
    # vLLM's prompt_logprobs agree with the echoed logprobs.
    prompt_lps = choice.model_extra["prompt_logprobs"]
    assert prompt_lps[0] is None and len(prompt_lps) == len(lp.tokens)
    ids = client.completions.create(model=MODEL, prompt=text, max_tokens=0).usage.prompt_tokens
    assert ids == len(prompt_lps)
    for step, token_lp in zip(prompt_lps[1:], lp.token_logprobs[1:]):
        assert any(abs(v["logprob"] - token_lp) < 1e-6 for v in step.values())


def test_generated_logprobs_and_seed(client):
    kwargs = {"model": MODEL, "prompt": "Write a poem", "max_tokens": 6, "temperature": 1.0, "seed": 11, "logprobs": 2}
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert first.choices[0].text == second.choices[0].text
    lp = first.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    # The chosen token is always among the top logprobs (different byte tokens may decode alike and merge).
    assert all(token in top and 1 <= len(top) <= 3 for token, top in zip(lp.tokens, lp.top_logprobs))


def test_stop_string(client):
    full = client.completions.create(model=MODEL, prompt="Write a poem", max_tokens=10, temperature=0).choices[0].text
    stop = full[6:9]
    cut = client.completions.create(model=MODEL, prompt="Write a poem", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


def test_chat_on_base_model_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="/v1/completions"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_chat_on_chat_model(chat_base_url):
    chat = openai.OpenAI(base_url=f"{chat_base_url}/v1", api_key=KEY, max_retries=0)
    out = chat.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2, temperature=0.7, seed=3
    )
    assert out.object == "chat.completion"
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.finish_reason in ("stop", "length") for c in out.choices)
    assert out.usage.prompt_tokens > 0
    scored = chat.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)  # greedy


def test_wrong_key_is_401(base_url):
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    response = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_too_long_prompt_is_400(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048 tokens"):
        client.completions.create(model=MODEL, prompt="x" * 2100, max_tokens=4)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "tiny", "prompt": ',  # malformed JSON
        b'{"model": "tiny", "prompt": "hi", "n": 0}',
        b'{"model": "tiny", "prompt": "hi", "max_tokens": -1}',
        b'{"model": "tiny", "prompt": "hi", "temperature": -1}',
        b'{"model": "tiny", "prompt": "hi", "top_p": 1.5}',
        b'{"model": "tiny", "prompt": ""}',
        b'{"model": "tiny", "prompt": {"a": 1}}',
        b'{"model": "tiny", "prompt": "hi", "stream": true}',
    ],
)
def test_bad_input_is_400(base_url, body):
    response = httpx.post(
        f"{base_url}/v1/completions",
        content=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="hi", max_tokens=1)


def test_concurrent_requests_are_batched(client, base_url):
    before = httpx.get(f"{base_url}/stats").json()
    start = Barrier(8)

    def one(i: int) -> str:
        start.wait()
        return client.completions.create(model=MODEL, prompt=f"Write a poem {i}", max_tokens=16, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    after = httpx.get(f"{base_url}/stats").json()
    assert all(isinstance(t, str) for t in texts)
    assert after["sequences_run"] - before["sequences_run"] == 8
    assert after["batches_run"] - before["batches_run"] < 8
    assert after["max_batch_seen"] > 1


def test_tokens_as_token_ids(client, tiny_model_dir):
    """vLLM's return_tokens_as_token_ids: echo log-probs name each token by id (what pair_builder scores with)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "# Query: hi there" + tok.eos_token
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1,
                                  extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [f"token_id:{i}" for i in tok(text)["input_ids"]]
    assert lp.tokens[-1] == f"token_id:{tok.eos_token_id}"  # the eos text is the eos token, as TRL tokenizes it
    plain = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1).choices[0].logprobs
    assert lp.token_logprobs == plain.token_logprobs and lp.text_offset == plain.text_offset


@pytest.fixture(scope="module")
def limited_url(tiny_model_dir, tmp_path_factory):
    yield from _start_server(tiny_model_dir, tmp_path_factory.mktemp("server") / "limited.log", "--backend",
                             "embedded", "--max-prompts", "2", "--max-n", "2", "--max-stop", "2",
                             "--max-request-tokens", "300", "--max-scored-tokens", "40")


@pytest.mark.parametrize("body,match", [
    ({"prompt": ["a", "b", "c"], "max_tokens": 1}, "3 prompts in one request: this server takes at most 2"),
    ({"prompt": "hi", "n": 3, "max_tokens": 1}, "n=3: this server gives at most 2 choices"),
    ({"prompt": "hi", "stop": ["a", "b", "c"], "max_tokens": 1}, "stop: at most 2 strings"),
    ({"prompt": "hi", "stop": ["x" * 300], "max_tokens": 1}, "of at most 256 characters"),
    ({"prompt": ["hi", "ho"], "n": 2, "max_tokens": 100}, "over this server's 300 (--max-request-tokens)"),
    ({"prompt": "word " * 60, "max_tokens": 0, "echo": True, "logprobs": 1}, "(--max-scored-tokens)"),
    ({"prompt": "word " * 60, "max_tokens": 1, "prompt_logprobs": 1}, "(--max-scored-tokens)"),
])
def test_requests_past_the_limits_are_400_naming_the_limit(limited_url, body, match):
    r = httpx.post(f"{limited_url}/v1/completions", json={"model": MODEL, **body},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["message"]


def test_requests_within_the_limits_are_served(limited_url):
    c = openai.OpenAI(base_url=f"{limited_url}/v1", api_key=KEY, max_retries=0, timeout=60)
    r = c.completions.create(model=MODEL, prompt=["hi", "ho"], n=2, max_tokens=4, stop=["a", "b"])
    assert len(r.choices) == 4
    r = c.completions.create(model=MODEL, prompt="a b c", max_tokens=0, echo=True, logprobs=1)
    assert r.choices[0].logprobs.token_logprobs
