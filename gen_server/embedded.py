"""Embedded CPU backend of gen_server: an OpenAI-compatible HTTP server over a transformers model.

It answers the parameters the pipeline uses the way vLLM's OpenAI server does: /v1/completions with
string or token-id prompts (lists of them too), n, stop, seed, logprobs, echo (echo + max_tokens=0
scores given text) and vLLM's `prompt_logprobs`; /v1/chat/completions for models with a chat
template; /v1/models; /health. Requests run on `gen_server.engine.Engine`, which batches concurrent
requests on a worker thread, so the event loop never blocks on the model. /stats reports batching.

    python -m gen_server --backend embedded --model path/to/model --port 8000   # the one command line
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gen_server.engine import (
    MAX_LOGPROBS,
    Completion,
    Engine,
    SamplingParams,
    TokenLogprob,
)
from shared.log import setup_logging

logger = logging.getLogger(__name__)

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed"}

Prompt = str | list[str] | list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]]


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    error_type = _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": error_type, "param": param, "code": status}},
    )


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


MAX_STOP_CHARS = 256


def create_app(engine: Engine, *, api_key: str | None, served_model_name: str,
               limits: RequestLimits = RequestLimits()) -> FastAPI:
    """The FastAPI app serving `engine`; every /v1 route needs `Authorization: Bearer <api_key>` if set."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        logger.info(
            "embedded server ready: model %r from %s (max_model_len=%d, max_batch_size=%d)",
            served_model_name, engine.model_dir, engine.max_model_len, engine.max_batch_size,
        )
        yield

    app = FastAPI(title="gen_server (embedded)", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; OpenAI and vLLM answer 400 with a readable message.
        errors = exc.errors()
        if any(err["type"] == "json_invalid" for err in errors):
            return _error_response(400, "The request body is not valid JSON.")
        problems = []
        for err in errors:
            where = ".".join(str(part) for part in err["loc"] if part != "body")
            problems.append(f"{where}: {err['msg']}" if where else err["msg"])
        first_param = next((str(err["loc"][1]) for err in errors if len(err["loc"]) > 1), None)
        return _error_response(400, "Invalid request: " + "; ".join(problems), first_param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request to %s failed", request.url.path)
        return _error_response(500, f"Internal server error: {exc!r}")

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.")

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{served_model_name}`.", "model")

    async def run(prompts: list[str | list[int]], params: SamplingParams, n: int) -> list[Completion]:
        try:
            return await engine.generate(prompts, params, n=n)
        except ValueError as exc:  # bad prompt or too long for the context
            raise APIError(400, str(exc), "prompt") from exc

    def sampling_params(req: _Request, max_tokens: int, **extra: Any) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=(req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ()),
            seed=req.seed,
            **extra,
        )

    def reject_streaming(req: _Request) -> None:
        if req.stream:
            raise APIError(400, "streaming is not supported by the embedded backend", "stream")

    def usage(prompt_tokens: int, results: list[Completion]) -> dict[str, int]:
        completion_tokens = sum(len(r.token_ids) for r in results)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, float]:
        return engine.stats()

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{
                "id": served_model_name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "selfalign",
                "root": str(engine.model_dir),
                "parent": None,
                "max_model_len": engine.max_model_len,
            }],
        }

    @v1.post("/completions")
    async def completions(req: CompletionRequest) -> dict[str, Any]:
        check_model(req.model)
        reject_streaming(req)
        # A list of ints is one token-id prompt; any other list is a batch of prompts.
        prompts: list[str | list[int]] = (
            [req.prompt] if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int))
            else list(req.prompt)
        )
        if not prompts:
            raise APIError(400, "the prompt is empty", "prompt")
        prompt_ids = [_encode(engine, p) for p in prompts]
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = max(0, engine.max_model_len - max(len(ids) for ids in prompt_ids))
        # Echoed logprobs cover the prompt too, so they need prompt log-probs at the same depth.
        prompt_k = max(
            (k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None), default=None
        )
        params = sampling_params(req, max_tokens, logprobs=req.logprobs, prompt_logprobs=prompt_k)
        limits.check([len(ids) for ids in prompt_ids], req.n, max_tokens, params.stop, prompt_k is not None)
        results = await run(prompt_ids, params, req.n)

        choices = []
        for index, result in enumerate(results):  # prompt-major: prompt i's choices are i*n .. i*n+n-1
            prompt = prompts[index // req.n]
            prompt_text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)
            choice: dict[str, Any] = {
                "index": index,
                "text": prompt_text + result.text if req.echo else result.text,
                "logprobs": None if req.logprobs is None else _completion_logprobs(
                    engine, result, req.logprobs, req.echo, as_ids=req.return_tokens_as_token_ids),
                "finish_reason": result.finish_reason,
            }
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = _vllm_prompt_logprobs(engine, result.prompt_logprobs, req.prompt_logprobs)
            choices.append(choice)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": served_model_name,
            "choices": choices,
            "usage": usage(sum(len(ids) for ids in prompt_ids), results),
        }

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest) -> dict[str, Any]:
        check_model(req.model)
        if not engine.has_chat_template:
            raise APIError(
                400,
                f"The model `{served_model_name}` has no chat template (it is a base model), so chat "
                "completions are not available. Use /v1/completions with a base-model prompt instead.",
            )
        reject_streaming(req)
        import jinja2  # only chat needs it (transformers renders chat templates with it)

        try:
            text = engine.tokenizer.apply_chat_template(
                [m.model_dump(exclude_none=True) for m in req.messages], add_generation_prompt=True, tokenize=False
            )
        except jinja2.TemplateError as exc:  # e.g. a role order the template does not allow
            raise APIError(400, f"The chat template rejected the messages: {exc}", "messages") from exc
        # The template already holds any special tokens, so none are added (as vLLM does for chat).
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(0, engine.max_model_len - len(ids))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(req, max_tokens, logprobs=logprobs)
        limits.check([len(ids)], req.n, max_tokens, params.stop, False)
        results = await run([ids], params, req.n)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served_model_name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "logprobs": None if logprobs is None else _chat_logprobs(engine, r, logprobs),
                    "finish_reason": r.finish_reason,
                }
                for i, r in enumerate(results)
            ],
            "usage": usage(len(ids), results),
        }

    app.include_router(v1)
    return app


def _encode(engine: Engine, prompt: str | list[int]) -> list[int]:
    try:
        return engine.encode(prompt)
    except ValueError as exc:
        raise APIError(400, str(exc), "prompt") from exc


def _completion_logprobs(engine: Engine, result: Completion, k: int, echo: bool, *,
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
        return f"token_id:{t}" if as_ids else engine.tokenizer.decode([t])

    for token_id, entry in zip(token_ids, entries):
        text = engine.tokenizer.decode([token_id])
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
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}


def _chat_logprobs(engine: Engine, result: Completion, k: int) -> dict[str, list]:
    """OpenAI's chat logprobs: per generated token its string, bytes, log-prob and the k most likely."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        token = engine.tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**item(entry.token_id, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top[:k]]}
            for entry in result.logprobs
        ]
    }


def _vllm_prompt_logprobs(engine: Engine, entries: list[TokenLogprob | None], k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None, then per prompt token {token_id: {logprob, rank, decoded_token}}."""
    out: list[dict | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        step = {
            str(entry.token_id): {
                "logprob": entry.logprob, "rank": entry.rank, "decoded_token": engine.tokenizer.decode([entry.token_id])
            }
        }
        for rank, (token_id, logprob) in enumerate(entry.top[:k], start=1):
            step.setdefault(
                str(token_id), {"logprob": logprob, "rank": rank, "decoded_token": engine.tokenizer.decode([token_id])}
            )
        out.append(step)
    return out


def serve(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_batch_size: int = 16,
    max_model_len: int | None = None,
    dtype: str = "auto",
    seed: int = 0,
    log_level: str = "info",
    limits: RequestLimits = RequestLimits(),
) -> None:
    """Load the model and serve it until interrupted (blocks)."""
    if not logging.getLogger().handlers:  # an entry point that configured logging keeps its set-up
        setup_logging(log_level)
    engine = Engine(model_dir, dtype=dtype, max_batch_size=max_batch_size, max_model_len=max_model_len, seed=seed)
    app = create_app(engine, api_key=api_key, served_model_name=served_model_name or Path(model_dir).resolve().name,
                     limits=limits)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
    finally:
        engine.close()
