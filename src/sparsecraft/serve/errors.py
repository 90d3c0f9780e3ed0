"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with a 4xx status for every bad request.

Handlers for FastAPI's own failures (unparseable JSON, a body that fails the request model, unknown routes) turn
them into the same shape; an unexpected exception becomes a 500 in that shape too (a bug, but never a dead
server).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("sparsecraft.serve")

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the server refuses: HTTP `status` with an OpenAI error body (and extra headers, e.g.
    `Retry-After` on 429)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _is_type_tag(part) -> bool:
    """Whether a location part is pydantic's name of a union member it tried (`str`, `list[int]`,
    `function-after[...]`), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part)


def _field_path(location: tuple) -> list:
    """The field's part of an error location: `("body", "stop", "list[str]", 1)` -> `["stop", 1]`."""
    return [p for p in location if p != "body" and not _is_type_tag(p)]


def _param_of(path: list) -> str | None:
    """`["messages", 0, "role"]` -> `messages[0].role`."""
    text = ""
    for p in path:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or None


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid" or (first.get("loc") == ("body",) and first.get("type") == "missing"):
        return error_response(400, "the request body is not valid JSON", None, "invalid_json")
    # a value no member of a union accepts gives one error per member: name the deepest place (a list's bad
    # element rather than the list) and every member's complaint there
    paths = [_field_path(tuple(e.get("loc", ()))) for e in errors or [first]]
    param = _param_of(max(paths, key=len))
    message = "; ".join(dict.fromkeys(str(e.get("msg")) for e, path in zip(errors or [first], paths)
                                      if _param_of(path) == param))
    return error_response(422, f"{param}: {message}" if param else message, param, "invalid_value")


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    return error_response(exc.status_code, message, None, None, getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}", None, "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
