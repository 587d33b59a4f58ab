"""The HTTP server: FastAPI routes over one `AsyncEngine`.

Routes: GET /health (no key needed), GET /metrics (Prometheus), GET /v1/models,
POST /v1/completions, POST /v1/chat/completions, GET / and /static/* (the playground).
Contract:
- Every error is an OpenAI error body {"error": {message, type, param, code}}: 400 for bad JSON,
  types, values, unsupported fields and too-long prompts; 401 for a missing or wrong API key (every
  route but /health and the static playground files, which hold no data: the page asks for the
  key); 404 for an unknown model or route; 413 for a body over `max_body_bytes`; 429 when the
  waiting queue is full; 504 past the request timeout; 500 only for a genuine server fault.
- Bodies are parsed by protocol.py, never by FastAPI, so there is no 422.
- The engine thread starts with the app's lifespan and stops after uvicorn has drained the open
  requests (uvicorn's graceful shutdown on SIGTERM).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from ..diffusion.params import DiffusionParams
from ..engine.engine import LLM
from ..engine.request import SamplingParams
from .async_engine import AsyncEngine
from .chunks import Formatter
from .metrics import Metrics
from .plan import Limits, build_plan
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_request
from .responder import Disconnected, SSEResponse, collect, stream_events

STATIC = Path(__file__).parent / "static"
PUBLIC = ("/health", "/", "/favicon.ico")
log = logging.getLogger("blockdiff.server")


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int = 64                  # choices waiting for a slot before 429
    request_timeout: float = 600.0       # seconds, per HTTP request
    max_body_bytes: int = 1 << 20


def error_response(err: ApiError) -> Response:
    """The OpenAI error body; ASCII-escaped JSON, so no message can fail to encode."""
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return Response(json.dumps(err.body()), status_code=err.status, headers=headers, media_type="application/json")


class Guard:
    """ASGI middleware: API key, body size limit, and the error-count metric for every response."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.rejected.labels(str(message["status"])).inc()
            await send(message)

        err = self._check(scope)
        if err is not None:
            return await error_response(err)(scope, receive, counted_send)
        limit, seen = self.config.max_body_bytes, 0

        async def limited_receive():         # bodies without Content-Length (chunked) are counted too
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
            return message

        await self.app(scope, limited_receive, counted_send)

    def _check(self, scope) -> ApiError | None:
        headers = dict(scope["headers"])
        path = scope["path"]
        key = self.config.api_key
        if key and path not in PUBLIC and not path.startswith("/static/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                code="invalid_api_key", type="authentication_error")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.config.max_body_bytes):
            return ApiError(413, f"the request body is over {self.config.max_body_bytes} bytes",
                            code="request_too_large")
        return None


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    metrics = Metrics()
    engine = AsyncEngine(llm, metrics, config.max_queue)
    limits = Limits(*llm.limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="blockdiff", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(Guard, config=config, metrics=metrics)
    _add_error_handlers(app)

    def prepare(raw: bytes, kind: type):
        """Parse, tokenize, render templates and process images: CPU work kept off the event loop."""
        return build_plan(parse_request(raw, kind), llm.inputs, limits, config.model_name, llm.defaults)

    async def generate(request: Request, kind: type):
        plan = await asyncio.to_thread(prepare, await request.body(), kind)
        group = engine.submit(plan.choices, frames=plan.frames is not None)
        fmt = Formatter(plan, llm.tokenizer)
        if plan.stream:
            return SSEResponse(stream_events(group, fmt, plan, request, config.request_timeout), group.close)
        try:
            return JSONResponse(await collect(group, fmt, request, config.request_timeout))
        except Disconnected:
            return Response(status_code=499)
        finally:
            group.close()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatCompletionRequest)

    _add_info_routes(app, engine, metrics, config, limits, llm.defaults)
    return app


def _add_info_routes(app: FastAPI, engine: AsyncEngine, metrics: Metrics, config: ServerConfig, limits: Limits,
                     defaults: SamplingParams) -> None:
    """The model list (with the knobs a request that leaves them out gets, which the playground shows),
    health, Prometheus metrics and the playground page."""
    knobs = {f.name: getattr(defaults, f.name) for f in fields(DiffusionParams)}
    knobs.update(top_k=defaults.top_k, top_p=defaults.top_p)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "blockdiff", "max_model_len": limits.max_model_len,
                                            "blockdiff_sampling_defaults": knobs}]}

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(err.status_code, str(err.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return error_response(ApiError(400, str(err.errors()[:1])))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        log.exception("unhandled error")
        return error_response(ApiError(500, f"internal error: {type(err).__name__}", type="server_error"))
