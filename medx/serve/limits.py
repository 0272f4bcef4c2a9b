"""What the service refuses, and how early: before a byte is stored where possible.

- A missing or wrong bearer token: 401, before the body is read (an unauthenticated client
  cannot make the service store an upload).
- A body over `max_bytes`: 413 at once when its Content-Length says so; otherwise (chunked,
  or a client that lies) when the count of bytes received passes the limit, while it streams:
  the rest is never read. Any answer given before the body was read to its end closes the
  connection, so the server does not read (to drain it) what it refused.
- A type other than JPEG, PNG, BMP, TIFF, WebP or DICOM (what `medx.predict` reads): 415,
  told from the file's first bytes, never from its name or the Content-Type a client claims.
- The token is compared in constant time; the scheme word is case-insensitive (`bearer` is
  `Bearer`, RFC 9110 11.1).

`Guard` is plain ASGI middleware around the whole app, so it sees the request before any
form parsing (Starlette's multipart parser spools uploads to disk as they arrive) and counts
exactly what the parser is handed.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse

from medx.errors import MedxError
from medx.serve.docs import ASSET_PATHS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Paths anyone may call: probes, and the API's description (no data, no model card).
OPEN_PATHS = frozenset(
    {"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json", *ASSET_PATHS}
)
SNIFF_BYTES = 132  # DICOM's "DICM" marker sits at bytes 128..131
ACCEPTED = "JPEG, PNG, BMP, TIFF, WebP or DICOM (Part 10: with the DICM marker at byte 128)"
TYPES = ("jpeg", "png", "bmp", "tiff", "webp", "dicom")
_BMP_HEADERS = (12, 40, 52, 56, 64, 108, 124)  # the sizes of BMP's info headers (after 14 bytes)


class Refused(MedxError):
    """A request the service will not serve: the HTTP status and a message a person can act on."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.headers = dict(headers or {})


def error_body(status: int, message: str) -> dict[str, Any]:
    """Every error the service answers: {"status", "error" (the reason phrase), "message"}."""
    return {"status": status, "error": HTTPStatus(status).phrase, "message": message}


def error_response(err: Refused) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message), err.status, err.headers)


def sniff(head: bytes) -> str | None:
    """One of TYPES from a file's first SNIFF_BYTES bytes; None for anything else."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith(b"BM") and int.from_bytes(head[14:18], "little") in _BMP_HEADERS:
        return "bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    return None


def unsupported_type(name: str, head: bytes) -> Refused:
    shown = head[:8].hex(" ") if head else "nothing"
    return Refused(
        415,
        f"Upload {name!r} is not an image this service reads (its first bytes are {shown}; "
        f"the type is told from the bytes, not from the file name). It reads {ACCEPTED}: "
        "send the image in one of these formats, converting it first if needed.",
    )


def too_large(max_bytes: int, declared: int | None = None) -> Refused:
    if declared is None:
        what = f"passed the service's limit of {max_bytes / 1e6:.1f} MB and was cut off there"
    else:
        what = (
            f"is {declared / 1e6:.1f} MB (its Content-Length), over the service's limit of "
            f"{max_bytes / 1e6:.1f} MB, and was not read"
        )
    return Refused(
        413,
        f"The upload {what}. Send a smaller file (compress it, or export the image at a lower "
        "resolution), or ask the operator to raise --max-bytes.",
    )


class Guard:
    """ASGI middleware: the bearer token, then the body size (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int, token: str | None = None) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.expected = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # lower-case names; the last of repeated ones
        has_body = b"content-length" in headers or b"transfer-encoding" in headers
        body = _Body(receive, self.max_bytes, has_body)
        send = body.closing(send)
        refusal = self._authorise(scope, headers) or self._declared_size(headers)
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, body.receive, send)

    def _authorise(self, scope: Scope, headers: dict[bytes, bytes]) -> Refused | None:
        if self.expected is None or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return None
        given = headers.get(b"authorization")
        scheme, _, credentials = (given or b"").strip().partition(b" ")
        bearer = scheme.lower() == b"bearer"
        if bearer and secrets.compare_digest(credentials.strip(), self.expected):
            return None
        problem = "no Authorization header" if given is None else "a wrong token"
        if given is not None and not bearer:
            problem = "another scheme than Bearer"
        return Refused(
            401,
            f"This service needs a bearer token and the request had {problem}. Send the "
            "header 'Authorization: Bearer <token>' with the token the operator gave you.",
            {"WWW-Authenticate": "Bearer"},
        )

    def _declared_size(self, headers: dict[bytes, bytes]) -> Refused | None:
        declared = headers.get(b"content-length")
        if declared is None:
            return None
        try:
            length = int(declared)
        except ValueError:
            return Refused(400, f"Content-Length {declared!r} is not a number.")
        return too_large(self.max_bytes, length) if length > self.max_bytes else None


class _Body:
    """One request's body as the app reads it: counted against max_bytes (Refused 413 once
    past it), and whether it was read to its end. A response that starts before then (a
    refusal) closes the connection, so the server does not go on reading a body nobody wants
    (uvicorn would otherwise drain it to reuse the connection)."""

    def __init__(self, receive: Receive, max_bytes: int, expected: bool) -> None:
        self.source, self.max_bytes = receive, max_bytes
        self.received, self.done = 0, not expected

    async def receive(self) -> Message:
        message = await self.source()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
            if self.received > self.max_bytes:
                raise too_large(self.max_bytes)
        return message

    def closing(self, send: Send) -> Send:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and not self.done:
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        return sending
