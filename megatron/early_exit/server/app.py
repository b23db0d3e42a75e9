"""The HTTP layer (FastAPI, rank 0): typed requests in, engine jobs to the worker, replies out.

Errors never come back as a 200: a foreign Host a 400, a body that is not JSON a 415 and
one over the size limit a 413 (guard.py, before anything is parsed), a body that does not
parse a 400, one that does not validate a 422, a request the loaded model cannot serve
(unknown exit, context too long, too many prompts, a field its decoding would ignore) or the
engine refuses a 400, an unknown path a 404, a wrong method a 405, a full queue a 503. Every
error body is OpenAI's envelope, {"error": {"message", "type", "param", "code"}}, with the
message starting with the field it is about. The OpenAPI schema is at /openapi.json, the
docs at /docs. CORS headers are sent only for the origins the server was started with.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from megatron.early_exit.inference import GenerationResult, InferenceConfigError
from megatron.early_exit.server.guard import HttpPolicy, RequestGuard, error_response
from megatron.early_exit.server.jobs import Job, ModelLimits, RequestError
from megatron.early_exit.server.megatron_api import api_job, api_response
from megatron.early_exit.server.openai_api import completion, completion_job, stream_chunks
from megatron.early_exit.server.schemas import (
    ApiRequest, ApiResponse, Completion, CompletionRequest, Health, ModelCard, ModelList,
)
from megatron.early_exit.server.worker import QueueFull, Worker


@dataclass
class Service:
    """What the endpoints share: the worker that decodes, the tokenizer, the model's limits."""

    worker: Worker
    tokenizer: object
    limits: ModelLimits
    created: int = field(default_factory=lambda: int(time.time()))

    async def generate(self, job: Job) -> GenerationResult:
        return await asyncio.wrap_future(self.worker.submit(job))


def _field(loc) -> str:
    parts = [str(p) for p in loc[1:]] if loc and loc[0] == "body" else [str(p) for p in loc]
    return ".".join(parts) or "body"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        return error_response(400, "body: malformed JSON: " + "; ".join(e["msg"] for e in errors), "body")
    if [(e["type"], tuple(e["loc"])) for e in errors] == [("missing", ("body",))]:
        return error_response(400, "body: empty: send a JSON object", "body")
    first = errors[0]["loc"] if errors else ()
    param = str(first[1]) if len(first) > 1 and first[0] == "body" else None
    message = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in errors[:4])
    return error_response(422, message, param)


ENDPOINTS = "PUT /api, POST /v1/completions, GET /v1/models, GET /health, GET /docs"


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (no route, wrong method, a body it cannot decode) in our shape."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        message, param = f"{where}: no such endpoint (this server has {ENDPOINTS})", None
    elif exc.status_code == 405:
        message, param = f"{where}: method not allowed (this server has {ENDPOINTS})", None
    elif exc.status_code == 400:
        message, param = f"body: not valid JSON ({exc.detail})", "body"
    else:
        message, param = f"{where}: {exc.detail}", None
    return error_response(exc.status_code, message, param, headers=getattr(exc, "headers", None))


async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(400, str(exc), exc.param)


async def _engine_error(request: Request, exc: InferenceConfigError) -> JSONResponse:
    return error_response(400, str(exc))


async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
    return error_response(503, str(exc), kind="server_busy")


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"{type(exc).__name__}: {exc}", kind="server_error")


def build_app(service: Service, policy: HttpPolicy = HttpPolicy()) -> FastAPI:
    app = FastAPI(title="Megatron early-exit text generation",
                  description="Megatron-LM's PUT /api and OpenAI's completions, with early-exit decoding options.")
    app.add_middleware(RequestGuard, policy=policy)
    if policy.cors_origins:  # outermost, so that refusals carry CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(policy.cors_origins),
                           allow_methods=["GET", "PUT", "POST"], allow_headers=["Content-Type", "Authorization"])
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(InferenceConfigError, _engine_error)
    app.add_exception_handler(QueueFull, _queue_full)
    app.add_exception_handler(Exception, _internal_error)
    tokenizer, limits = service.tokenizer, service.limits

    @app.put("/api", response_model=ApiResponse, response_model_exclude_none=True)
    async def api(request: ApiRequest) -> ApiResponse:
        job, prompts = await run_in_threadpool(api_job, request, tokenizer, limits)
        result = await service.generate(job)
        return await run_in_threadpool(api_response, request, tokenizer, prompts, result)

    @app.post("/v1/completions", response_model=Completion)
    async def completions(request: CompletionRequest):
        job, prompts = await run_in_threadpool(completion_job, request, tokenizer, limits)
        result = await service.generate(job)
        reply, texts = await run_in_threadpool(completion, request, tokenizer, limits.name, prompts, result)
        if not request.stream:
            return reply
        chunks = await run_in_threadpool(lambda: list(stream_chunks(request, tokenizer, reply, texts)))

        def events():
            for chunk in chunks:
                yield f"data: {json.dumps(chunk.model_dump())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=limits.name, created=service.created, num_layers=limits.num_layers,
                                         exit_layer_nums=list(limits.exit_layer_nums),
                                         max_sequence_length=limits.max_sequence_length)])

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(queued=service.worker.queued, busy=service.worker.busy, served=service.worker.served)

    return app
