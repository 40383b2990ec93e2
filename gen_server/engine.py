"""Batching generation engine over a transformers causal LM on CPU (the embedded backend's core).

One background worker thread owns the model. Callers queue sequences with `Engine.submit` (thread-safe,
returns a `concurrent.futures.Future`) or `await Engine.generate(...)` (asyncio); the worker collects
whatever is queued (waiting a few ms when idle so near-simultaneous requests share a batch), left-pads
it and decodes the rows together with a KV cache. Sequences that arrive while a batch runs form the
next batch. Every row has its own sampling settings and its own seeded `torch.Generator`, so a seeded
row samples the same tokens whatever else is in its batch.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

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


class Engine:
    """A transformers model on CPU, decoding queued sequences together in batches on a worker thread."""

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
        self._stats: dict[str, float] = {"batches_run": 0, "sequences_run": 0, "max_batch_seen": 0, "busy_s": 0.0}
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
        """Counters for monitoring, tests and benchmarks: batches and sequences run, the largest batch, seconds
        the worker spent generating (``busy_s``: wall time minus this is time the server waited for clients),
        queue depth."""
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

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)
        self._fail_queued()

    def _fail_queued(self) -> None:
        """Fail whatever is still queued so no caller waits forever."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeError("the engine was closed before this request ran"))

    def _run(self, batch: list[_Pending]) -> None:
        t0 = time.perf_counter()
        try:
            results = self._generate(batch)
        except Exception as exc:
            self._stats["busy_s"] += time.perf_counter() - t0
            if len(batch) == 1:
                logger.exception("generation failed for a sequence of %d prompt tokens", len(batch[0].prompt_ids))
                batch[0].future.set_exception(exc)
                return
            # Re-run the rows one by one so only the sequence that fails gets the error.
            logger.warning("a batch of %d failed (%r); retrying its sequences one at a time", len(batch), exc)
            for pending in batch:
                self._run([pending])
            return
        self._stats["busy_s"] += time.perf_counter() - t0
        for pending, result in zip(batch, results):
            pending.future.set_result(result)

    @torch.inference_mode()
    def _generate(self, batch: list[_Pending]) -> list[Completion]:
        self._stats["batches_run"] += 1
        self._stats["sequences_run"] += len(batch)
        self._stats["max_batch_seen"] = max(self._stats["max_batch_seen"], len(batch))
        rows = len(batch)
        width = max(len(p.prompt_ids) for p in batch)
        input_ids = torch.full((rows, width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, width), dtype=torch.long)
        for i, pending in enumerate(batch):  # left padding: every row's next token sits in the last column
            input_ids[i, width - len(pending.prompt_ids):] = torch.tensor(pending.prompt_ids)
            attention_mask[i, width - len(pending.prompt_ids):] = 1
        # Positions count real tokens only, so a padded row sees the same positions as when alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        want_prompt_logprobs = any(p.params.prompt_logprobs is not None for p in batch)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=0 if want_prompt_logprobs else 1,  # full logits only when prompt scoring is asked
        )
        prompt_logprobs = [
            None if p.params.prompt_logprobs is None
            else _prompt_logprobs(out.logits[i, width - len(p.prompt_ids):], p.prompt_ids, p.params.prompt_logprobs)
            for i, p in enumerate(batch)
        ]
        logits = out.logits[:, -1].float()
        cache = out.past_key_values
        del out

        generators = [torch.Generator().manual_seed(p.seed) for p in batch]
        tokens: list[list[int]] = [[] for _ in batch]
        token_logprobs: list[list[TokenLogprob]] = [[] for _ in batch]
        texts = [""] * rows
        finish: list[str | None] = ["length" if p.params.max_tokens == 0 else None for p in batch]
        want_logprobs = any(p.params.logprobs is not None for p in batch)
        for _ in range(max(p.params.max_tokens for p in batch)):
            logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
            next_ids = torch.full((rows, 1), self._pad_id, dtype=torch.long)
            for i, pending in enumerate(batch):
                if finish[i] is not None:
                    continue
                params = pending.params
                token = _sample(logits[i], params, generators[i])
                tokens[i].append(token)
                next_ids[i, 0] = token
                if params.logprobs is not None:
                    token_logprobs[i].append(_token_logprob(logprobs[i], token, params.logprobs))
                finish[i], texts[i] = self._check_finish(tokens[i], params)
            if all(f is not None for f in finish):
                break
            # Finished rows keep decoding a pad token: cheaper than re-shaping the cache mid-batch.
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((rows, 1))], dim=-1)
            position_ids = position_ids[:, -1:] + 1
            out = self.model(
                input_ids=next_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1].float()
            cache = out.past_key_values

        return [
            Completion(
                prompt_token_ids=p.prompt_ids,
                token_ids=tokens[i],
                text=texts[i],
                finish_reason=finish[i] or "length",
                logprobs=token_logprobs[i] if p.params.logprobs is not None else None,
                prompt_logprobs=prompt_logprobs[i],
            )
            for i, p in enumerate(batch)
        ]

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
