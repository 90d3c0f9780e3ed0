"""The FastAPI application: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`.

Handlers validate (pydantic models, then context and model checks), hand a `GenerationRequest` to the engine
and either stream its events as server-sent events or collect them into one JSON body. A client that goes away
cancels its request, which frees its batch slot on the next step.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .engine import Engine
from .errors import APIError, error_body, install_error_handlers
from .limits import BodyLimit
from .prompts import chat_prompt_ids, check_sampling, completion_budget, completion_prompt_ids
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from .requests import EngineStopped, GenerationRequest, QueueFull
from .responses import ChunkWriter, RequestChannel, full_response, new_id

# how often a request without news checks that its client is still there (a streamed one writes an SSE comment)
DISCONNECT_POLL_S = 0.5


def create_app(engine: Engine, *, model_name: str, context: int, max_body_bytes: int = 4 << 20) -> FastAPI:
    """An app serving `engine`'s model as `model_name` with a `context`-token window. The engine thread starts
    with the app and stops after uvicorn has drained the requests in flight."""
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="sparsecraft", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "sparsecraft",
                "max_model_len": context}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    async def respond(kind: str, body: SamplingFields, ids: list[int], request: Request, prompt_param: str):
        max_tokens = completion_budget(len(ids), body, context, prompt_param)
        channel = RequestChannel()
        gen = GenerationRequest(ids, max_tokens, channel.sink, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop=body.stop_list(), ignore_eos=body.ignore_eos)
        try:
            engine.submit(gen)
        except QueueFull:
            raise APIError(429, "the server is busy: its request queue is full; retry shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineStopped as exc:  # shutting down, or the engine thread failed
            raise APIError(503, str(exc), code="shutting_down") from None
        rid = new_id(kind)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            writer = ChunkWriter(kind, rid, model_name, include_usage)
            return StreamingResponse(stream(channel, gen, writer), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await collect(channel, gen, request, kind, rid))

    async def collect(channel: RequestChannel, gen: GenerationRequest, request: Request, kind: str, rid: str):
        pieces = []
        checked = time.monotonic()
        try:
            while True:
                try:
                    event = await channel.get(DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = None
                # by the clock, not only when no event came: tokens arrive every step while the client may be gone
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        engine.cancel(gen)
                        return {}
                if event is None:
                    continue
                if event.kind == "text":
                    pieces.append(event.text)
                elif event.kind == "done":
                    return full_response(kind, rid, model_name, "".join(pieces), event)
                else:
                    raise APIError(500, event.text, code="generation_failed")
        finally:
            engine.cancel(gen)  # a no-op once finished; frees the slot when this task was cancelled

    async def stream(channel: RequestChannel, gen: GenerationRequest, writer: ChunkWriter):
        try:
            opening = writer.opening()
            if opening:
                yield opening
            while True:
                try:
                    event = await channel.get(DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    yield ": waiting\n\n"  # an SSE comment: a write, so a client that left is noticed
                    continue
                if event.kind == "text":
                    yield writer.text(event.text)
                elif event.kind == "done":
                    yield writer.closing(event)
                    return
                else:
                    yield writer.error(error_body(500, event.text, None, "generation_failed"))
                    return
        finally:
            engine.cancel(gen)  # the client disconnected mid-stream, or the stream ended: free the slot

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        check_sampling(body)
        ids = await run_in_threadpool(chat_prompt_ids, engine.tokenizer, body)
        return await respond("chat", body, ids, request, "messages")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        check_sampling(body)
        ids = await run_in_threadpool(completion_prompt_ids, engine.tokenizer, body)
        return await respond("text", body, ids, request, "prompt")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health():
        stats = engine.stats()
        status = "ok" if stats["alive"] else "stopped"
        return JSONResponse({"status": status, "model": model_name, **stats}, status_code=200 if stats["alive"]
                            else 503)

    return app
