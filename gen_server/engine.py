"""Continuous-batching generation engine over a transformers causal LM on CPU (the embedded backend's core).

One background worker thread owns the model. Callers queue sequences with `Engine.submit` (thread-safe,
returns a `concurrent.futures.Future`) or `await Engine.generate(...)` (asyncio).

Scheduling (iteration-level, as in Orca/vLLM): the worker keeps one running batch of at most `max_batch_size`
rows and loops over step boundaries. At each boundary it
  1. admits queued sequences first-come first-served into the free rows (when idle it blocks for the first
     one and waits `batch_wait_s` for near-simultaneous companions; when busy it takes only what is already
     queued), prefills them together as their own left-padded mini-batch, resolves those with max_tokens=0,
     and merges the rest into the running KV cache, left-padding the narrower side so rows stay right-aligned;
  2. samples one token for every row; rows that finish (EOS, stop string, length) resolve their futures at
     once and leave the batch, and cache columns that became padding in every row are trimmed;
  3. runs one decode forward for the remaining rows.
Prefill is prioritised over decoding (running rows pause while newcomers prefill), which keeps the batch full
at some cost in inter-token latency. Positions count each row's real tokens only and padding is masked out, and
every row has its own sampling settings and seeded `torch.Generator`, so a row's tokens do not depend on which
sequences share its batch or when they joined. Failures stay with their sequence: a failed prefill is retried
one sequence at a time, a failed decode step re-runs its rows alone from scratch (seeds are fixed at submit,
so healthy rows produce the same completions), and a sampling error fails only its row.

Semantics follow vLLM's /v1/completions: prompts are tokenized with the tokenizer's default special
tokens, stop strings cut the text before the stop string, EOS and stop strings finish with "stop",
the token budget with "length", and log-probabilities are the model's raw (pre-temperature) ones.

    engine = Engine("path/to/model")
    [completion] = engine.submit("# Query: hi\\n# Answer:", SamplingParams(max_tokens=32)).result()
    engine.close()
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # same cap as OpenAI's completions API

# "auto" is float32 on CPU: 16-bit matmuls are slower than float32 on most CPUs and less exact.
DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ContextLengthError(ValueError):
    """The prompt plus the requested completion does not fit the model's context."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence generation settings (names and meaning as in the OpenAI/vLLM APIs)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # top-k log-probs of each generated token; None = don't compute
    prompt_logprobs: int | None = None  # top-k log-probs of each prompt token given its prefix

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must fit in a signed 64-bit integer, got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {k}")


@dataclass(frozen=True)
class TokenLogprob:
    """Log-prob of one chosen token, its 1-based rank, and the `k` most likely tokens (best first)."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class Completion:
    """One finished sequence."""

    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens, including a final EOS or the token that completed a stop string
    text: str  # generated text, special tokens skipped, cut before a stop string
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    logprobs: list[TokenLogprob] | None  # one per generated token, when requested
    prompt_logprobs: list[TokenLogprob | None] | None  # one per prompt token (first is None), when requested


@dataclass
class _Pending:
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # fixed at submit time so a retried sequence samples exactly the same tokens
    future: Future


@dataclass
class _Row:
    """A sequence in the running batch: its request, its sampler and what it has generated so far."""

    pending: _Pending
    generator: torch.Generator
    prompt_logprobs: list[TokenLogprob | None] | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def completion(self, text: str, finish_reason: str) -> Completion:
        return Completion(
            prompt_token_ids=self.pending.prompt_ids,
            token_ids=self.tokens,
            text=text,
            finish_reason=finish_reason,
            logprobs=self.logprobs if self.pending.params.logprobs is not None else None,
            prompt_logprobs=self.prompt_logprobs,
        )


@dataclass
class _Batch:
    """Sequences decoding together; row i of every tensor belongs to `rows[i]`.

    Rows are right-aligned: each row's latest token is in the last column, its padding in the leading columns
    (zeros in `mask`, zero keys/values in `cache`, which the mask hides).
    """

    rows: list[_Row]
    cache: DynamicCache  # per layer: keys/values [rows, kv_heads, columns, head_dim]
    mask: torch.Tensor  # [rows, columns], 1 = real token
    logits: torch.Tensor  # [rows, vocab] float32, each row's next-token logits


class Engine:
    """A transformers model on CPU, decoding queued sequences with continuous batching on a worker thread."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        max_batch_size: int = 16,
        max_model_len: int | None = None,
        seed: int = 0,
        batch_wait_s: float = 0.005,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=DTYPES[dtype]).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if max_model_len is not None and limit is not None and max_model_len > limit:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={limit}")
        if max_model_len is None and limit is None:
            raise ValueError("the model config has no max_position_embeddings; pass max_model_len")
        self.max_model_len: int = max_model_len or limit
        self.has_chat_template = bool(self.tokenizer.chat_template)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._vocab_size = self.model.get_input_embeddings().num_embeddings
        self._eos_ids = self._collect_eos_ids()
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else min(self._eos_ids, default=0)
        # Seeds for requests without one: reproducible per server seed, distinct per request.
        self._seed_rng = torch.Generator().manual_seed(seed)
        self._seed_lock = threading.Lock()
        self._stats: dict[str, float] = {
            "batches_run": 0, "sequences_run": 0, "max_batch_seen": 0, "decode_steps": 0, "busy_s": 0.0,
        }
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="gen-engine", daemon=True)
        self._worker.start()
        logger.info(
            "loaded %s (%s, max_model_len=%d, max_batch_size=%d)",
            self.model_dir, self.model.dtype, self.max_model_len, max_batch_size,
        )

    def _collect_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    # ---- public API -------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt, as vLLM's /v1/completions makes them; token-id prompts are checked."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self._vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {self._vocab_size})")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def count_tokens(self, text: str) -> int:
        """Number of tokens `text` takes as a completion prompt."""
        return len(self.tokenizer(text)["input_ids"])

    def check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ContextLengthError (vLLM's wording) if prompt + completion exceed max_model_len."""
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({num_prompt_tokens} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion."
            )

    def submit(self, prompt: str | Sequence[int], params: SamplingParams) -> Future[Completion]:
        """Queue one sequence; thread-safe. Invalid requests raise ValueError here, before queuing."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        ids = self.encode(prompt)
        self.check_length(len(ids), params.max_tokens)
        seed = params.seed
        if seed is None:
            with self._seed_lock:
                seed = int(torch.randint(2**62, (), generator=self._seed_rng))
        future: Future[Completion] = Future()
        self._queue.put(_Pending(ids, params, seed, future))
        return future

    async def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams, n: int = 1
    ) -> list[Completion]:
        """Generate `n` completions per prompt without blocking the event loop; prompt-major order.

        All prompts are validated before any is queued, so a bad one fails the call as a whole.
        With a seed, choice i of each prompt uses seed + i (as vLLM does for n > 1).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        encoded = [self.encode(p) for p in prompts]
        for ids in encoded:
            self.check_length(len(ids), params.max_tokens)
        futures = [
            self.submit(ids, params if params.seed is None else dataclasses.replace(params, seed=params.seed + i))
            for ids in encoded
            for i in range(n)
        ]
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    def stats(self) -> dict[str, float]:
        """Counters for monitoring, tests and benchmarks.

        ``batches_run``: prefills (each admits a group of sequences that arrived together into the running batch);
        ``sequences_run``: sequences prefilled; ``max_batch_seen``: most rows decoding at once; ``decode_steps``:
        decode forwards of the running batch; ``busy_s``: seconds the worker spent generating (wall time minus
        this is time the server waited for clients); ``queued``: sequences waiting for a free row.
        """
        return {**self._stats, "queued": self._queue.qsize()}

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop accepting sequences, let the worker finish those already queued, then stop it."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout)
        self._fail_queued()  # a submit racing with close() may have queued behind the stop marker

    # ---- worker -----------------------------------------------------------------------------------

    @torch.inference_mode()  # for the whole thread: every tensor the batch state holds is an inference tensor
    def _work(self) -> None:
        """The scheduling loop (see the module docstring): admit newcomers, sample a token per row, decode a step."""
        running: _Batch | None = None
        stopping = False
        while running is not None or not stopping:
            newcomers: list[_Pending] = []
            if not stopping:
                free = self.max_batch_size - (len(running.rows) if running else 0)
                newcomers, stopping = self._take(free, block=running is None)
            t0 = time.perf_counter()
            if newcomers:
                running = self._admit(running, newcomers)
            if running is not None:
                running = self._step(running)
            self._stats["busy_s"] += time.perf_counter() - t0
        self._fail_queued()

    def _take(self, free: int, *, block: bool) -> tuple[list[_Pending], bool]:
        """Up to `free` queued sequences, and whether the stop marker was reached.

        Idle (`block`): wait for a first sequence, then up to `batch_wait_s` for near-simultaneous ones. Busy: only
        what is queued already, so running rows never wait for arrivals.
        """
        taken: list[_Pending] = []
        deadline = time.monotonic() + self.batch_wait_s
        while len(taken) < free:
            try:
                if block and not taken:
                    item = self._queue.get()
                elif block:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return taken, True
            if item.future.set_running_or_notify_cancel():
                taken.append(item)
        return taken, False

    def _fail_queued(self) -> None:
        """Fail whatever is still queued so no caller waits forever."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeError("the engine was closed before this request ran"))

    def _admit(self, running: _Batch | None, newcomers: list[_Pending]) -> _Batch | None:
        """Prefill `newcomers` together and merge them into `running`; returns the new running batch.

        A failure is retried one sequence at a time, so only a sequence that fails alone gets the error; `running`
        is left intact either way (`_merge` changes nothing unless it succeeds).
        """
        try:
            batch = self._prefill(newcomers)
            keep = []
            for i, row in enumerate(batch.rows):
                if row.pending.params.max_tokens == 0:  # a scoring request: done, resolve it before paying for a merge
                    row.pending.future.set_result(row.completion("", "length"))
                else:
                    keep.append(i)
            batch = _select(batch, keep)
            merged = running if batch is None else _merge(running, batch)
        except Exception as exc:
            left = [p for p in newcomers if not p.future.done()]
            if len(left) == 1:
                logger.exception("prefill failed for a sequence of %d prompt tokens", len(left[0].prompt_ids))
                left[0].future.set_exception(exc)
                return running
            logger.warning("a batch of %d failed (%r); retrying its sequences one at a time", len(left), exc)
            for pending in left:
                running = self._admit(running, [pending])
            return running
        if merged is not None:
            self._stats["max_batch_seen"] = max(self._stats["max_batch_seen"], len(merged.rows))
        return merged

    def _prefill(self, pendings: list[_Pending]) -> _Batch:
        """Run the prompts as one left-padded batch; the result holds each row's next-token logits."""
        self._stats["batches_run"] += 1
        self._stats["sequences_run"] += len(pendings)
        rows = len(pendings)
        width = max(len(p.prompt_ids) for p in pendings)
        input_ids = torch.full((rows, width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, width), dtype=torch.long)
        for i, pending in enumerate(pendings):  # left padding: every row's next token sits in the last column
            input_ids[i, width - len(pending.prompt_ids):] = torch.tensor(pending.prompt_ids)
            attention_mask[i, width - len(pending.prompt_ids):] = 1
        # Positions count real tokens only, so a padded row sees the same positions as when alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        want_prompt_logprobs = any(p.params.prompt_logprobs is not None for p in pendings)
        # A plain (full-attention) DynamicCache: `_merge` and `_select` reshape its per-layer tensors directly.
        cache = DynamicCache()
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if want_prompt_logprobs else 1,  # full logits only when prompt scoring is asked
        )
        return _Batch(
            rows=[
                _Row(
                    pending=p,
                    generator=torch.Generator().manual_seed(p.seed),
                    prompt_logprobs=None if p.params.prompt_logprobs is None else _prompt_logprobs(
                        out.logits[i, width - len(p.prompt_ids):], p.prompt_ids, p.params.prompt_logprobs
                    ),
                )
                for i, p in enumerate(pendings)
            ],
            cache=cache,
            mask=attention_mask,
            logits=out.logits[:, -1].float().clone(),  # a copy, so the full prompt logits can be freed
        )

    def _step(self, batch: _Batch) -> _Batch | None:
        """Sample one token per row, resolve and drop finished rows, decode the rest one step; None when empty."""
        keep: list[int] = []
        for i, row in enumerate(batch.rows):
            try:
                finish, text = self._advance(row, batch.logits[i])
            except Exception as exc:
                logger.exception("sampling failed for a sequence of %d prompt tokens", len(row.pending.prompt_ids))
                row.pending.future.set_exception(exc)
                continue
            if finish is None:
                keep.append(i)
            else:
                row.pending.future.set_result(row.completion(text, finish))
        rows = [batch.rows[i] for i in keep]
        if not rows:
            return None
        try:
            remaining = _select(batch, keep)
            self._decode(remaining)
        except Exception as exc:
            # The cache may be half-updated and the culprit is unknown: re-run each row alone from scratch (seeds
            # were fixed at submit, so a healthy row produces exactly the same completion).
            if len(rows) == 1:
                logger.exception("decoding failed for a sequence of %d prompt tokens", len(rows[0].pending.prompt_ids))
                rows[0].pending.future.set_exception(exc)
                return None
            logger.warning("a batch of %d failed (%r); retrying its sequences one at a time", len(rows), exc)
            for row in rows:
                self._run_alone(row.pending)
            return None
        return remaining

    def _run_alone(self, pending: _Pending) -> None:
        """Generate one sequence from scratch in a batch of its own (newcomers wait meanwhile)."""
        batch = self._admit(None, [pending])
        while batch is not None:
            batch = self._step(batch)

    def _advance(self, row: _Row, logits: torch.Tensor) -> tuple[str | None, str]:
        """Sample the row's next token from its logits; (finish reason or None, text so far)."""
        params = row.pending.params
        token = _sample(logits, params, row.generator)
        row.tokens.append(token)
        if params.logprobs is not None:
            row.logprobs.append(_token_logprob(torch.log_softmax(logits, dim=-1), token, params.logprobs))
        return self._check_finish(row.tokens, params)

    def _decode(self, batch: _Batch) -> None:
        """Feed every row's latest token through the model, extending the cache and mask by one column."""
        self._stats["decode_steps"] += 1
        next_ids = torch.tensor([[row.tokens[-1]] for row in batch.rows])
        position_ids = batch.mask.sum(-1, keepdim=True)  # real tokens so far = the new token's position
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=-1)
        out = self.model(
            input_ids=next_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.mask = mask
        batch.logits = out.logits[:, -1].float()

    def _check_finish(self, tokens: list[int], params: SamplingParams) -> tuple[str | None, str]:
        """(finish reason or None, text so far) after appending the latest token."""
        if tokens[-1] in self._eos_ids:
            return "stop", self.tokenizer.decode(tokens, skip_special_tokens=True)
        if params.stop or len(tokens) >= params.max_tokens:
            # Decoding the whole sequence keeps multi-byte characters split across tokens intact.
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cuts = [i for i in (text.find(s) for s in params.stop) if i >= 0]
            if cuts:
                return "stop", text[: min(cuts)]
            return ("length" if len(tokens) >= params.max_tokens else None), text
        return None, ""


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Greedy for temperature 0, else temperature + nucleus (top-p) sampling with the row's generator."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        probs[(probs.cumsum(-1) - probs) >= params.top_p] = 0
        return int(order[torch.multinomial(probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def _token_logprob(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    value = logprobs[token]
    top = torch.topk(logprobs, k) if k else None
    return TokenLogprob(
        token_id=token,
        logprob=float(value),
        rank=int((logprobs > value).sum()) + 1,
        top=[] if top is None else list(zip(top.indices.tolist(), top.values.tolist())),
    )


def _prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], k: int) -> list[TokenLogprob | None]:
    """Log-prob of every prompt token given its prefix; the first token has no prefix, hence None."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    return [None] + [_token_logprob(row, token, k) for row, token in zip(logprobs, prompt_ids[1:])]


def _select(batch: _Batch, keep: list[int]) -> _Batch | None:
    """Keep only rows `keep` (None if none) and trim the leading columns that are now padding in every row."""
    if not keep:
        return None
    if len(keep) < len(batch.rows):
        index = torch.tensor(keep)
        batch.cache.batch_select_indices(index)
        batch.rows = [batch.rows[i] for i in keep]
        batch.mask = batch.mask[index]
        batch.logits = batch.logits[index]
    # E.g. after the row with the longest context left; slicing is free, the next cache update copies it anyway.
    pad = int((batch.mask.shape[1] - batch.mask.sum(-1)).min())
    if pad:
        for layer in batch.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, pad:], layer.values[:, :, pad:]
        batch.mask = batch.mask[:, pad:]
    return batch


def _merge(running: _Batch | None, new: _Batch) -> _Batch:
    """`running` with `new`'s rows appended: the narrower side is left-padded so both stay right-aligned.

    All new tensors are built before any is stored, so a failure (e.g. out of memory) leaves `running` intact.
    """
    if running is None:
        return new
    keys = [_stack_right_aligned(a.keys, b.keys) for a, b in zip(running.cache.layers, new.cache.layers)]
    values = [_stack_right_aligned(a.values, b.values) for a, b in zip(running.cache.layers, new.cache.layers)]
    mask = _stack_right_aligned(running.mask.unsqueeze(-1), new.mask.unsqueeze(-1)).squeeze(-1)
    logits = torch.cat([running.logits, new.logits])
    for layer, k, v in zip(running.cache.layers, keys, values):
        layer.keys, layer.values = k, v
    running.rows += new.rows
    running.mask, running.logits = mask, logits
    return running


def _stack_right_aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 tensors shaped [rows, ..., columns, x], left-padding the narrower with zeros."""
    width = max(a.shape[-2], b.shape[-2])
    out = a.new_zeros((a.shape[0] + b.shape[0], *a.shape[1:-2], width, a.shape[-1]))
    out[: a.shape[0], ..., width - a.shape[-2]:, :] = a
    out[a.shape[0]:, ..., width - b.shape[-2]:, :] = b
    return out
