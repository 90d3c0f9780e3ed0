"""Request bodies over a byte limit get 413 before any parsing (an ASGI middleware that buffers up to the limit)."""

from __future__ import annotations

from .errors import error_response


class BodyLimit:
    """ASGI middleware: POST bodies larger than `max_bytes` are answered 413 (by Content-Length when sent,
    else while reading), smaller ones are passed on whole."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self):
        return error_response(413, f"request body larger than {self.max_bytes} bytes", None, "request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: the real channel, which reports a disconnect

        await self.app(scope, replay, send)
