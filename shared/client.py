"""OpenAI-compatible client factory for our generation servers (embedded or vLLM).

The openai client already retries connection errors, 408/409/429 and 5xx with exponential backoff and
jitter (honouring Retry-After); we only choose the numbers. :func:`wait_for_health` turns "nothing is
listening" into a message that says how to start a server.

    wait_for_health("http://127.0.0.1:8000", timeout=60)
    client = make_client("http://127.0.0.1:8000", api_key="k")
    client.completions.create(model="smollm2-135m", prompt="# Query: ...", max_tokens=64)
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import openai


class ServerUnavailable(RuntimeError):
    """No healthy generation server at the given URL."""


def root_url(base_url: str) -> str:
    """``http://h:p``, ``http://h:p/`` and ``http://h:p/v1`` all name the same server."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def make_client(
    base_url: str,
    api_key: str | None = None,
    *,
    timeout: float = 600.0,
    max_retries: int = 6,
    asynchronous: bool = False,
) -> openai.OpenAI | openai.AsyncOpenAI:
    """A client for ``base_url`` (server root or ``.../v1``). ``api_key=None`` sends a dummy key."""
    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(
        base_url=root_url(base_url) + "/v1",
        api_key=api_key or "EMPTY",
        timeout=timeout,
        max_retries=max_retries,
    )


def _get(url: str, api_key: str | None, timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for_health(base_url: str, *, timeout: float = 60.0, interval: float = 0.5) -> None:
    """Block until ``GET /health`` answers 200, or raise :class:`ServerUnavailable` naming the fix."""
    url = root_url(base_url) + "/health"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            status, _ = _get(url, None, timeout=min(5.0, max(0.1, deadline - time.monotonic())))
            if status == 200:
                return
            last = f"HTTP {status}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if time.monotonic() >= deadline:
            raise ServerUnavailable(
                f"no healthy generation server at {root_url(base_url)} after {timeout:.0f}s ({last}). "
                f"Start one with `python -m gen_server --model DIR --port PORT --api-key KEY` "
                f"(or check the URL/port), then retry."
            )
        time.sleep(interval)


def served_models(base_url: str, api_key: str | None, *, timeout: float = 10.0) -> list[dict[str, Any]]:
    """``GET /v1/models``; a wrong key raises with a message saying where the key comes from."""
    status, body = _get(root_url(base_url) + "/v1/models", api_key, timeout)
    if status == 401:
        raise PermissionError(
            f"{root_url(base_url)} rejected the API key (HTTP 401): pass the key the server was started with "
            f"(--api-key or GEN_SERVER_API_KEY)."
        )
    if status != 200:
        raise ServerUnavailable(f"{root_url(base_url)}/v1/models answered HTTP {status}: {body[:200]!r}")
    return json.loads(body)["data"]
