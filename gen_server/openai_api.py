"""The OpenAI-compatible API of the embedded server as plain data: request models, checks and response builders.

Everything here is pure: request models in, JSON-ready dicts out, with no web framework and no engine thread,
so each piece is unit-tested on hand-made `Completion`s. Only the builders that print tokens take a tokenizer
(anything with `decode(ids) -> str`). `gen_server.embedded` wires them to HTTP routes and the `Engine`.

The shapes follow vLLM's OpenAI server, which the pipeline also talks to: /v1/completions with string or
token-id prompts (lists of them too), n, stop, seed, logprobs, echo (echo + max_tokens=0 scores given text)
and vLLM's `prompt_logprobs` / `return_tokens_as_token_ids`; /v1/chat/completions; /v1/models; errors as
{"error": {"message", "type", "param", "code"}} with vLLM's status codes.

    prompts = completion_prompts(req.prompt)            # a str / token-id list / batch -> one entry per prompt
    completion_response(req, prompts, results, prompt_tokens=7, tokenizer=tok, model="m")   # the response body
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from gen_server.engine import MAX_LOGPROBS, Completion, SamplingParams, TokenLogprob

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed"}

MAX_STOP_CHARS = 256

Prompt = str | list[str] | list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]]


class Tokenizer(Protocol):
    """What the builders need of a tokenizer: the text of token ids."""

    def decode(self, token_ids: list[int]) -> str: ...


# ---- errors -------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The JSON body of an error answer; the type is named after the status as OpenAI's client expects."""
    error_type = ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def invalid_request(errors: list[dict[str, Any]]) -> APIError:
    """The 400 for pydantic's validation `errors` of a request body (FastAPI would answer 422; OpenAI and vLLM
    answer 400 with a readable message), naming every problem and, as `param`, the first field at fault."""
    if any(err["type"] == "json_invalid" for err in errors):
        return APIError(400, "The request body is not valid JSON.")
    problems = []
    for err in errors:
        where = ".".join(str(part) for part in err["loc"] if part != "body")
        problems.append(f"{where}: {err['msg']}" if where else err["msg"])
    first_param = next((str(err["loc"][1]) for err in errors if len(err["loc"]) > 1), None)
    return APIError(400, "Invalid request: " + "; ".join(problems), first_param)


# ---- requests -----------------------------------------------------------------------------------------------


class _Request(BaseModel):
    # Unknown OpenAI/vLLM fields are ignored, as vLLM does, so clients can send their usual extras.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False


class CompletionRequest(_Request):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)  # None = the rest of the context, as in vLLM
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM extension
    # vLLM extension: logprob tokens as "token_id:<id>", so a client can tell tokens apart exactly
    return_tokens_as_token_ids: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool fields... are passed to the chat template

    role: str
    content: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)  # the newer OpenAI name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of the embedded server; past any of them it answers 400 naming the limit.
    Without them one request could take gigabytes: prompt log-probs over a 7,640-token prompt raised the
    server's memory from 1.3 to 4.8 GB, and n=1000 was served."""

    max_prompts: int = 64  # prompts in one /v1/completions request (a list prompt)
    max_n: int = 16  # choices per prompt
    max_stop: int = 16  # stop strings, each at most MAX_STOP_CHARS characters
    max_request_tokens: int = 65_536  # sum over every choice of its prompt tokens + max_tokens
    max_scored_tokens: int = 16_384  # prompt tokens scored with log-probs (echo, prompt_logprobs) in one request

    def check(self, prompt_lens: list[int], n: int, max_tokens: int, stop: tuple[str, ...], scored: bool) -> None:
        if len(prompt_lens) > self.max_prompts:
            raise APIError(400, f"{len(prompt_lens)} prompts in one request: this server takes at most "
                                f"{self.max_prompts} (--max-prompts); split the request", "prompt")
        if n > self.max_n:
            raise APIError(400, f"n={n}: this server gives at most {self.max_n} choices per prompt (--max-n)", "n")
        if len(stop) > self.max_stop or any(len(s) > MAX_STOP_CHARS for s in stop):
            raise APIError(400, f"stop: at most {self.max_stop} strings (--max-stop) of at most {MAX_STOP_CHARS} "
                                "characters each", "stop")
        total = sum((p + max_tokens) * n for p in prompt_lens)
        if total > self.max_request_tokens:
            raise APIError(400, f"the request needs {total} tokens (prompt + max_tokens, for each of its "
                                f"{len(prompt_lens) * n} choices): over this server's {self.max_request_tokens} "
                                "(--max-request-tokens); send fewer prompts or a lower n / max_tokens", "prompt")
        if scored and sum(prompt_lens) > self.max_scored_tokens:
            raise APIError(400, f"log-probs over {sum(prompt_lens)} prompt tokens in one request: over this "
                                f"server's {self.max_scored_tokens} (--max-scored-tokens); score fewer or shorter "
                                "prompts per request", "prompt")


def check_model(name: str | None, served_model_name: str) -> None:
    """404 unless the request names no model or the served one."""
    if name is not None and name != served_model_name:
        raise APIError(404, f"The model `{name}` does not exist. This server serves `{served_model_name}`.", "model")


def reject_streaming(req: _Request) -> None:
    """400 for `stream: true`: answers come whole."""
    if req.stream:
        raise APIError(400, "streaming is not supported by the embedded backend", "stream")


def completion_prompts(prompt: Prompt) -> list[str | list[int]]:
    """The prompts of a /v1/completions request: a list of ints is one token-id prompt; any other list is a batch."""
    prompts: list[str | list[int]] = (
        [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    )
    if not prompts:
        raise APIError(400, "the prompt is empty", "prompt")
    return prompts


def sampling_params(req: _Request, max_tokens: int, **extra: Any) -> SamplingParams:
    """The engine's settings for `req`; unset temperature and top_p are 1 (OpenAI's defaults), `extra` adds
    the log-prob settings."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=(req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ()),
        seed=req.seed,
        **extra,
    )


def completion_sampling_params(req: CompletionRequest, prompt_lens: list[int], max_model_len: int) -> SamplingParams:
    """Settings for a /v1/completions request whose prompts are `prompt_lens` tokens long: max_tokens=None is
    the rest of the context after the longest prompt, and echoed logprobs ask for prompt log-probs too."""
    max_tokens = req.max_tokens
    if max_tokens is None:
        max_tokens = max(0, max_model_len - max(prompt_lens))
    # Echoed logprobs cover the prompt too, so they need prompt log-probs at the same depth.
    prompt_k = max(
        (k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None), default=None
    )
    return sampling_params(req, max_tokens, logprobs=req.logprobs, prompt_logprobs=prompt_k)


def chat_sampling_params(req: ChatCompletionRequest, prompt_len: int, max_model_len: int) -> SamplingParams:
    """Settings for a /v1/chat/completions request whose rendered prompt is `prompt_len` tokens long;
    max_completion_tokens wins over max_tokens, and neither means the rest of the context."""
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = max(0, max_model_len - prompt_len)
    return sampling_params(req, max_tokens, logprobs=_chat_top_k(req))


def _chat_top_k(req: ChatCompletionRequest) -> int | None:
    return (req.top_logprobs or 0) if req.logprobs else None


# ---- responses ----------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, results: list[Completion]) -> dict[str, int]:
    """OpenAI's usage: `prompt_tokens` counts each prompt once, completion tokens sum over every choice."""
    completion_tokens = sum(len(r.token_ids) for r in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def models_response(served_model_name: str, root: str | Path, max_model_len: int) -> dict[str, Any]:
    """/v1/models: the one served model, with vLLM's `root` (where it was loaded from) and `max_model_len`."""
    return {
        "object": "list",
        "data": [{
            "id": served_model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "selfalign",
            "root": str(root),
            "parent": None,
            "max_model_len": max_model_len,
        }],
    }


def completion_response(req: CompletionRequest, prompts: list[str | list[int]], results: list[Completion], *,
                        prompt_tokens: int, tokenizer: Tokenizer, model: str) -> dict[str, Any]:
    """The `text_completion` body for `req` over `prompts` (as `completion_prompts` gives them).

    `results` are prompt-major, as `Engine.generate` returns them: prompt i's choices are i*n .. i*n+n-1.
    With echo each choice's text starts with its prompt's text (token-id prompts decoded)."""
    choices = []
    for index, result in enumerate(results):
        text = result.text
        if req.echo:
            prompt = prompts[index // req.n]
            text = (prompt if isinstance(prompt, str) else tokenizer.decode(prompt)) + text
        choice: dict[str, Any] = {
            "index": index,
            "text": text,
            "logprobs": None if req.logprobs is None else _completion_logprobs(
                tokenizer, result, req.logprobs, req.echo, as_ids=req.return_tokens_as_token_ids),
            "finish_reason": result.finish_reason,
        }
        if req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _vllm_prompt_logprobs(tokenizer, result.prompt_logprobs, req.prompt_logprobs)
        choices.append(choice)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, results),
    }


def chat_response(req: ChatCompletionRequest, results: list[Completion], *, prompt_tokens: int,
                  tokenizer: Tokenizer, model: str) -> dict[str, Any]:
    """The `chat.completion` body for `req`: one assistant message per choice."""
    k = _chat_top_k(req)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": None if k is None else _chat_logprobs(tokenizer, r, k),
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ],
        "usage": usage(prompt_tokens, results),
    }


def _completion_logprobs(tokenizer: Tokenizer, result: Completion, k: int, echo: bool, *,
                         as_ids: bool = False) -> dict[str, list]:
    """OpenAI's completion logprobs; with echo the prompt tokens come first (the first one has None).

    ``as_ids``: tokens are ``token_id:<id>`` strings (vLLM's ``return_tokens_as_token_ids``); text offsets
    still advance by each token's decoded text."""
    entries: list[TokenLogprob | None] = []
    token_ids: list[int] = []
    if echo:
        entries += result.prompt_logprobs
        token_ids += result.prompt_token_ids
    entries += result.logprobs
    token_ids += result.token_ids
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    offset = 0

    def name(t: int) -> str:
        return f"token_id:{t}" if as_ids else tokenizer.decode([t])

    for token_id, entry in zip(token_ids, entries):
        text = tokenizer.decode([token_id])
        token = name(token_id)
        tokens.append(token)
        text_offset.append(offset)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(entry.logprob)
        # Like vLLM: the k most likely tokens plus the chosen one.
        top = {name(t): lp for t, lp in entry.top[:k]}
        top.setdefault(token, entry.logprob)
        top_logprobs.append(top)
    return {
        "tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset
    }


def _chat_logprobs(tokenizer: Tokenizer, result: Completion, k: int) -> dict[str, list]:
    """OpenAI's chat logprobs: per generated token its string, bytes, log-prob and the k most likely."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**item(entry.token_id, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top[:k]]}
            for entry in result.logprobs
        ]
    }


def _vllm_prompt_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob | None], k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None, then per prompt token {token_id: {logprob, rank, decoded_token}}."""
    out: list[dict | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        step = {
            str(entry.token_id): {
                "logprob": entry.logprob, "rank": entry.rank, "decoded_token": tokenizer.decode([entry.token_id])
            }
        }
        for rank, (token_id, logprob) in enumerate(entry.top[:k], start=1):
            step.setdefault(
                str(token_id), {"logprob": logprob, "rank": rank, "decoded_token": tokenizer.decode([token_id])}
            )
        out.append(step)
    return out
