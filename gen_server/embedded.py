"""Embedded CPU backend of gen_server: an OpenAI-compatible HTTP server over a transformers model.

It answers what the pipeline asks the way vLLM's OpenAI server does: /v1/completions (string or token-id
prompts, n, stop, seed, logprobs, echo, vLLM's `prompt_logprobs`), /v1/chat/completions for models with a chat
template, /v1/models and /health; /stats reports batching. Requests run on `gen_server.engine.Engine`, which
batches concurrent requests on a worker thread, so the event loop never blocks on the model. This module is the
HTTP side only (routes, auth, error answers); request models, checks and response bodies are the pure functions
of `gen_server.openai_api`.

    python -m gen_server --backend embedded --model path/to/model --port 8000   # the one command line
"""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gen_server.engine import Completion, Engine, SamplingParams
from gen_server.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    RequestLimits,
    chat_response,
    chat_sampling_params,
    check_model,
    completion_prompts,
    completion_response,
    completion_sampling_params,
    error_body,
    invalid_request,
    models_response,
    reject_streaming,
)
from shared.log import setup_logging

logger = logging.getLogger(__name__)


def _error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param))


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
        error = invalid_request(exc.errors())
        return _error_response(error.status, error.message, error.param)

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

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, float]:
        return engine.stats()

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return models_response(served_model_name, engine.model_dir, engine.max_model_len)

    @v1.post("/completions")
    async def completions(req: CompletionRequest) -> dict[str, Any]:
        check_model(req.model, served_model_name)
        reject_streaming(req)
        prompts = completion_prompts(req.prompt)
        prompt_ids = [_encode(engine, p) for p in prompts]
        prompt_lens = [len(ids) for ids in prompt_ids]
        params = completion_sampling_params(req, prompt_lens, engine.max_model_len)
        limits.check(prompt_lens, req.n, params.max_tokens, params.stop, params.prompt_logprobs is not None)
        results = await _generate(engine, prompt_ids, params, req.n)
        return completion_response(req, prompts, results, prompt_tokens=sum(prompt_lens), tokenizer=engine.tokenizer,
                                   model=served_model_name)

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest) -> dict[str, Any]:
        check_model(req.model, served_model_name)
        if not engine.has_chat_template:
            raise APIError(
                400,
                f"The model `{served_model_name}` has no chat template (it is a base model), so chat "
                "completions are not available. Use /v1/completions with a base-model prompt instead.",
            )
        reject_streaming(req)
        ids = _chat_prompt_ids(engine, req)
        params = chat_sampling_params(req, len(ids), engine.max_model_len)
        limits.check([len(ids)], req.n, params.max_tokens, params.stop, False)
        results = await _generate(engine, [ids], params, req.n)
        return chat_response(req, results, prompt_tokens=len(ids), tokenizer=engine.tokenizer,
                             model=served_model_name)

    app.include_router(v1)
    return app


def _encode(engine: Engine, prompt: str | list[int]) -> list[int]:
    try:
        return engine.encode(prompt)
    except ValueError as exc:
        raise APIError(400, str(exc), "prompt") from exc


def _chat_prompt_ids(engine: Engine, req: ChatCompletionRequest) -> list[int]:
    """The token ids of `req`'s messages rendered by the model's chat template, ready for the answer."""
    import jinja2  # only chat needs it (transformers renders chat templates with it)

    try:
        text = engine.tokenizer.apply_chat_template(
            [m.model_dump(exclude_none=True) for m in req.messages], add_generation_prompt=True, tokenize=False
        )
    except jinja2.TemplateError as exc:  # e.g. a role order the template does not allow
        raise APIError(400, f"The chat template rejected the messages: {exc}", "messages") from exc
    # The template already holds any special tokens, so none are added (as vLLM does for chat).
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


async def _generate(engine: Engine, prompts: list[list[int]], params: SamplingParams, n: int) -> list[Completion]:
    try:
        return await engine.generate(prompts, params, n=n)
    except ValueError as exc:  # bad prompt or too long for the context
        raise APIError(400, str(exc), "prompt") from exc


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
