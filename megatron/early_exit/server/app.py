"""The HTTP layer (FastAPI, rank 0): typed requests in, engine jobs to the worker, replies out.

Errors never come back as a 200: a foreign Host a 400, a body that is not JSON a 415 and
one over the size limit a 413 (guard.py, before anything is parsed), a body that does not
parse a 400, one that does not validate a 422, a request the loaded model cannot serve
(unknown exit, context too long, too many prompts, a field its decoding would ignore) or the
engine refuses a 400, an unknown path a 404, a wrong method a 405, a full queue a 503. Every
error body is OpenAI's envelope, {"error": {"message", "type", "param", "code"}}, plus the
same message at the top level (Megatron-LM's client reads `message`), starting with the
field it is about. The OpenAPI schema is at /openapi.json, the docs at /docs. CORS headers
are sent only for the origins the server was started with.

Streamed replies (stream: true) wait for the first decoded token before answering, so that
a request the engine refuses still gets its 4xx; then every token is sent as it is decoded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from megatron.early_exit.inference import InferenceConfigError
from megatron.early_exit.server.chat_api import chat_chunks, chat_completion, chat_job
from megatron.early_exit.server.guard import HttpPolicy, RequestGuard, error_response
from megatron.early_exit.server.jobs import AnyJob, ModelLimits, RequestError
from megatron.early_exit.server.megatron_api import api_jobs, api_response
from megatron.early_exit.server.metrics import ServingMetrics
from megatron.early_exit.server.openai_api import completion, completion_jobs, empty_result, stream_chunks
from megatron.early_exit.server.schemas import (
    LONE_SURROGATE,
    ApiRequest,
    ApiResponse,
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    Health,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from megatron.early_exit.server.streaming import sse
from megatron.early_exit.server.tokenizer_api import TokenizerFacts, detokenize, tokenize
from megatron.early_exit.server.worker import QueueFull, Worker


@dataclass
class Service:
    """What the endpoints share: the worker that decodes, the tokenizer, the model's limits."""

    worker: Worker
    tokenizer: object
    limits: ModelLimits
    chat_template: Optional[str] = None
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.facts = TokenizerFacts(self.tokenizer, self.chat_template)
        self.metrics = ServingMetrics(self.worker)

    def submit(self, job: AnyJob):
        """The worker's future of the job, its tokens timed for /metrics."""
        job, done = self.metrics.track(job)
        future = self.worker.submit(job)
        future.add_done_callback(done)
        return future

    async def generate(self, job: Optional[AnyJob]):
        """The job's result (None for no job). A caller that goes away cancels the future,
        which aborts the job's sequences under continuous batching."""
        return None if job is None else await asyncio.wrap_future(self.submit(job))

    async def stream(self, job: AnyJob) -> AsyncIterator:
        """The job's TokenEvents as the engine decodes them, then its result. Waits for the
        first event, so that a refused job raises here, before any reply is sent."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done, cancel = object(), threading.Event()
        future = self.submit(
            dataclasses.replace(
                job, listener=lambda event: loop.call_soon_threadsafe(queue.put_nowait, event), cancel=cancel
            )
        )
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, done))
        first = await queue.get()
        if first is done:
            future.result()  # the engine's error, if any

        async def events():
            item = first
            try:
                while item is not done:
                    yield item
                    item = await queue.get()
                yield future.result()
            finally:
                # The reply ended, or its client left: a queued job is skipped, a running one
                # stops (static batching: at its next step; continuous: its sequences are
                # aborted and their slots free at the next step).
                future.cancel()
                cancel.set()

        return events()


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
    # Text that is not valid Unicode is a malformed body (400), not an out-of-range value.
    return error_response(400 if any(e["type"] == LONE_SURROGATE for e in errors) else 422, message, param)


ENDPOINTS = (
    "PUT /api, POST /v1/completions, POST /v1/chat/completions, GET /tokenizer_info, POST /tokenize, "
    "POST /detokenize, GET /v1/models, GET /health, GET /metrics, GET /docs"
)


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


RETRY_AFTER_SECONDS = 1


async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
    return error_response(503, str(exc), kind="server_busy", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"{type(exc).__name__}: {exc}", kind="server_error")


def build_app(service: Service, policy: HttpPolicy = HttpPolicy()) -> FastAPI:
    app = FastAPI(
        title="Megatron early-exit text generation",
        description="Megatron-LM's PUT /api, OpenAI's completions and chat completions and vLLM's "
        "tokenizer endpoints, with early-exit decoding options.",
    )
    app.add_middleware(RequestGuard, policy=policy)
    if policy.cors_origins:  # outermost, so that refusals carry CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(policy.cors_origins),
            allow_methods=["GET", "PUT", "POST"],
            allow_headers=["Content-Type", "Authorization"],
        )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(InferenceConfigError, _engine_error)
    app.add_exception_handler(QueueFull, _queue_full)
    app.add_exception_handler(Exception, _internal_error)
    tokenizer, limits = service.tokenizer, service.limits

    @app.put("/api", response_model=ApiResponse, response_model_exclude_none=True)
    async def api(request: ApiRequest) -> ApiResponse:
        jobs = await run_in_threadpool(api_jobs, request, tokenizer, limits)
        result, scores = await asyncio.gather(service.generate(jobs.generate), service.generate(jobs.score))
        return await run_in_threadpool(api_response, request, tokenizer, jobs.prompts, result, scores)

    @app.post("/v1/completions", response_model=Completion)
    async def completions(request: CompletionRequest):
        jobs = await run_in_threadpool(completion_jobs, request, tokenizer, limits)
        if request.stream:
            scores = await service.generate(jobs.score)
            events = await service.stream(jobs.generate) if jobs.generate is not None else _nothing()
            return sse(stream_chunks(request, tokenizer, limits.name, jobs.prompts, scores, events))
        result, scores = await asyncio.gather(service.generate(jobs.generate), service.generate(jobs.score))
        result = result or empty_result(len(jobs.prompts.ids), limits.num_layers)
        reply, _ = await run_in_threadpool(completion, request, tokenizer, limits.name, jobs.prompts, result, scores)
        return reply

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat(request: ChatRequest):
        job, prompts = await run_in_threadpool(chat_job, request, service.facts, limits)
        if request.stream:
            return sse(chat_chunks(request, tokenizer, limits.name, prompts, await service.stream(job)))
        result = await service.generate(job)
        return await run_in_threadpool(chat_completion, request, tokenizer, limits.name, prompts, result)

    @app.get("/tokenizer_info", response_model=TokenizerInfo)
    async def tokenizer_info() -> TokenizerInfo:
        return service.facts.info(limits)

    @app.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True)
    async def tokenize_text(request: TokenizeRequest) -> TokenizeResponse:
        return await run_in_threadpool(tokenize, request, service.facts, limits)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize_tokens(request: DetokenizeRequest) -> DetokenizeResponse:
        return await run_in_threadpool(detokenize, request, service.facts, limits)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=limits.name,
                    created=service.created,
                    num_layers=limits.num_layers,
                    exit_layer_nums=list(limits.exit_layer_nums),
                    max_sequence_length=limits.max_sequence_length,
                )
            ]
        )

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(queued=service.worker.queued, busy=service.worker.busy, served=service.worker.served)

    return app


async def _nothing():
    return
    yield  # an empty async generator: max_tokens 0 streams the echoed prompt only
