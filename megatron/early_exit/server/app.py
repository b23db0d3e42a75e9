"""The HTTP layer (FastAPI, rank 0): typed requests in, engine jobs to the worker, replies out.

Errors never come back as a 200: a body that does not parse is a 400, one that does not
validate a 422, a request the loaded model cannot serve (unknown exit, context too long,
too many prompts) or the engine refuses a 400, a full queue a 503. Every error body is
OpenAI's envelope, {"error": {"message", "type", "param"}}, with the message starting with
the field it is about. The OpenAPI schema is at /openapi.json, the docs at /docs.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from megatron.early_exit.inference import GenerationResult, InferenceConfigError
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


def error_response(status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
                   detail=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


def _field(loc) -> str:
    parts = [str(p) for p in loc[1:]] if loc and loc[0] == "body" else [str(p) for p in loc]
    return ".".join(parts) or "body"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
    if any(e["type"] == "json_invalid" for e in errors):
        return error_response(400, "body: malformed JSON: " + "; ".join(e["msg"] for e in errors), "body", detail=detail)
    first = errors[0]["loc"] if errors else ()
    param = str(first[1]) if len(first) > 1 and first[0] == "body" else None
    message = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in errors[:4])
    return error_response(422, message, param, detail=detail)


async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(400, str(exc), exc.param)


async def _engine_error(request: Request, exc: InferenceConfigError) -> JSONResponse:
    return error_response(400, str(exc))


async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
    return error_response(503, str(exc), kind="server_busy")


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"{type(exc).__name__}: {exc}", kind="server_error")


class JSONBodies:
    """Read every PUT/POST body as JSON whatever its Content-Type says (`curl -d` sends a form
    type; FastAPI would then not parse the body at all)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("PUT", "POST"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


def build_app(service: Service) -> FastAPI:
    app = FastAPI(title="Megatron early-exit text generation",
                  description="Megatron-LM's PUT /api and OpenAI's completions, with early-exit decoding options.")
    app.add_middleware(JSONBodies)
    app.add_exception_handler(RequestValidationError, _validation_error)
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
