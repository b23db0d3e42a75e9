"""What the HTTP layer accepts before any endpoint runs (an ASGI middleware in front of FastAPI).

    Host            one of the allowed hosts (the bound address, localhost, 127.0.0.1, [::1],
                    plus --allowed-hosts; `*` allows any): a page on another site that rebinds
                    its DNS name to 127.0.0.1 sends its own name, and is refused (400)
    Content-Type    PUT and POST bodies are application/json (415 otherwise): a web page can
                    send text/plain or a form to any site without a CORS preflight, not JSON
    body size       at most --max-request-bytes (413): checked against Content-Length before
                    reading, then counted while reading, so an oversized body is never held
                    in memory or parsed
    body time       the whole body within --body-read-timeout seconds of the headers (408 and
                    the connection closed): a client that stops mid-body holds no connection

Every refusal is in the server's error shape ({"error": {"message", "type", "param", "code"}, "message"})
with the message starting with the header or flag it is about.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from fastapi.responses import JSONResponse

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB
DEFAULT_BODY_READ_TIMEOUT = 60.0  # seconds, as nginx's client_body_timeout
# Generous room per prompt token: a byte-level token escaped as \uXXXX is 6 bytes, a token id
# with its separator up to 8, a long whitespace or code token 16 and more.
BYTES_PER_PROMPT_TOKEN = 32
JSON_TYPE = "application/json"


def error_response(
    status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error", headers=None
) -> JSONResponse:
    # OpenAI's envelope, and the top-level message that Megatron-LM's text_generation_cli.py prints.
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}, "message": message}
    return JSONResponse(body, status_code=status, headers=headers)


def stream_error(err: Exception) -> dict:
    """The error event that ends a stream whose reply had started (as error_response's body)."""
    param = getattr(err, "param", None)
    kind = "invalid_request_error" if param is not None else "server_error"
    message = str(err) if param is not None else f"{type(err).__name__}: {err}"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}, "message": message}


@dataclass(frozen=True)
class HttpPolicy:
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    body_read_timeout: float = DEFAULT_BODY_READ_TIMEOUT  # seconds for the whole body
    allowed_hosts: Optional[Tuple[str, ...]] = LOCAL_HOSTS  # None: any host
    cors_origins: Tuple[str, ...] = ()  # empty: no CORS headers at all


def default_max_request_bytes(max_batch_size: int, max_prompt_tokens: int) -> int:
    """1 MiB, or more where the server's largest request (every prompt at its longest) needs it."""
    return max(DEFAULT_MAX_REQUEST_BYTES, 64 * 1024 + max_batch_size * max_prompt_tokens * BYTES_PER_PROMPT_TOKEN)


def host_name(value: str) -> str:
    """The host of a Host header or a flag, without port, case or trailing dot: `[::1]:5000` -> `[::1]`."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    if value.count(":") > 1:  # a bare IPv6 address, as --host takes it
        return f"[{value}]"
    return value.split(":", 1)[0].rstrip(".")


def allowed_hosts(bound_host: str, extra: Sequence[str]) -> Optional[Tuple[str, ...]]:
    if "*" in extra:
        return None
    names = [host_name(bound_host), *LOCAL_HOSTS, *(host_name(h) for h in extra)]
    return tuple(dict.fromkeys(n for n in names if n))


class RequestGuard:
    """Refuses, before the app reads anything, requests from a foreign Host, PUT/POST bodies
    that are not JSON, and bodies over the size limit; hands the app the body it read."""

    def __init__(self, app, policy: HttpPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        refusal = self._refuse_headers(scope["method"], headers)
        if refusal is None and scope["method"] in ("PUT", "POST"):
            body, refusal = await self._read_body(receive)
            if refusal is None:
                if body is None:
                    return  # the client went away
                receive = _replay(body, receive)
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _refuse_headers(self, method: str, headers: dict) -> Optional[JSONResponse]:
        hosts = self.policy.allowed_hosts
        host = headers.get("host", "")
        if hosts is not None and host_name(host) not in hosts:
            return error_response(
                400,
                f"Host: {host!r} is not a name of this server (allowed: {', '.join(hosts)}; "
                "the server's --allowed-hosts adds names, '*' any)",
                "Host",
            )
        if method not in ("PUT", "POST"):
            return None
        kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != JSON_TYPE:
            return error_response(
                415,
                f"Content-Type: {kind or 'none'!r} is not accepted: send the body as JSON "
                f"with Content-Type: {JSON_TYPE}",
                "Content-Type",
            )
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return error_response(400, f"Content-Length: {length!r} is not a byte count", "Content-Length")
            if int(length) > self.policy.max_request_bytes:
                return self._too_large(f"{int(length)} bytes")
        return None

    async def _read_body(self, receive):
        """(the body, None), (None, a 413) once it passes the limit, (None, a 408) when it has
        not all arrived in time, or (None, None) on a disconnect."""
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.policy.body_read_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - asyncio.get_running_loop().time(), 0))
            except asyncio.TimeoutError:
                return None, error_response(
                    408,
                    f"body: not received within the server's --body-read-timeout of "
                    f"{self.policy.body_read_timeout:g} s ({size} bytes arrived)",
                    "body",
                    headers={"Connection": "close"},
                )
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.policy.max_request_bytes:
                return None, self._too_large(f"more than {self.policy.max_request_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_large(self, size: str) -> JSONResponse:
        # Connection: close, so the server stops reading the rest of the body.
        return error_response(
            413,
            f"body: {size} exceed the server's --max-request-bytes {self.policy.max_request_bytes}",
            "body",
            headers={"Connection": "close"},
        )


def _replay(body: bytes, receive):
    """The ASGI `receive` of a body already read: the body once, then the client's own messages
    (a disconnect, which streaming replies listen for)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay
