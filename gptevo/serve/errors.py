"""Errors the server answers with: an HTTP status and an OpenAI-style error object.

The body is ``{"error": {"message", "type", "param", "code"}}`` as in OpenAI's API, so the official
clients raise their usual exception classes (``BadRequestError`` for 400, ``NotFoundError`` for 404,
``AuthenticationError`` for 401, ...). ``message`` names the field, header or limit at fault.
"""
from __future__ import annotations

from gptevo.errors import RequestError


class ApiError(RequestError):
    """A request the server refuses: ``status`` (4xx/5xx) and the fields of the error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def overloaded(retry_after_s: int, message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="server_overloaded",
                    headers={"Retry-After": str(retry_after_s)})
