"""OpenAI response bodies and server-sent-event chunks, and the bridge from the engine thread to a request.

`RequestChannel` is what a request's `sink` writes to: events cross from the engine thread into the server's
event loop with `call_soon_threadsafe`, into an unbounded per-request queue, so the engine never waits for a
client.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from .requests import Event


class RequestChannel:
    """The events of one request, readable with `await channel.get()` on the loop that made it."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def sink(self, event: Event) -> None:
        """Called on the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass  # the loop has closed (server stopped): nobody is listening any more

    async def get(self, timeout: float | None = None) -> Event:
        if timeout is None:
            return await self.queue.get()
        return await asyncio.wait_for(self.queue.get(), timeout)


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(done: Event) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def full_response(kind: str, rid: str, model: str, text: str, done: Event) -> dict:
    """The non-streamed body of a chat completion (`kind` "chat") or text completion."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": done.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(done), "system_fingerprint": None}


class ChunkWriter:
    """Server-sent events in OpenAI's chunk format for one streamed request."""

    def __init__(self, kind: str, rid: str, model: str, include_usage: bool) -> None:
        self.kind = kind
        self.rid = rid
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())

    def _chunk(self, choices: list, **extra) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "system_fingerprint": None}
        if self.include_usage:  # OpenAI: every chunk then has `usage`, null except on the last
            body["usage"] = None
        body.update(extra)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _choice(self, text: str | None, finish: str | None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def opening(self) -> str | None:
        """Chat streams start with a chunk that names the role."""
        return self._chunk([self._choice(None, None, role=True)]) if self.kind == "chat" else None

    def text(self, delta: str) -> str:
        return self._chunk([self._choice(delta, None)])

    def closing(self, done: Event) -> str:
        out = self._chunk([self._choice(None, done.finish_reason)])
        if self.include_usage:
            out += self._chunk([], usage=usage(done))
        return out + "data: [DONE]\n\n"

    @staticmethod
    def error(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"
