"""The HTTP control server: kill, re-arm, status, health and readiness over aiohttp.

Routes (JSON in and out; see docs/control.md):

=========================  ==========  =====================================================
``POST /v1/kill``          kill role   ``{"reason": str, "mode"?: "cancel"|"flatten"}``
``POST /v1/arm``           arm role    ``{"reason": str, "force"?: bool}``
``GET  /v1/status``        read role   the handler's status
``GET  /healthz``          none        200 while the process serves requests, with what it
                                       waits for (``handler.waiting_for()``)
``GET  /readyz``           none        200 when ``handler.ready()``, else 503; both say
                                       ``waiting_for``: null, "ib_connect" or "ib_sync"
=========================  ==========  =====================================================

Answers: 200 accepted, 202 re-arm pending a second operator, 409 refused by the guard, 400
malformed JSON or a missing field, 401 no or unknown token, 403 wrong role, 408 body not received
within ``body_timeout_s``, 413 body over ``max_body_bytes``, 415 a command body that is not
``application/json``, 422 valid JSON with invalid values; 404 / 405 as aiohttp gives them. Every
answer carries ``X-Request-Id``, and every error body ``{"error", "message", "request_id"}``, even
one for a request aiohttp could not parse. A refused command changes nothing and goes to
``handler.audit``. Others add routes (``/metrics``) with ``routes=`` or through ``server.app``
before entering the context.

Under exhaustion (the kill must still get in):

- a connection must send its request headers within ``header_timeout_s`` of opening (or of its
  last answer; aiohttp's keep-alive timer, which also covers a connection that sends nothing),
  and a command's body within ``body_timeout_s`` (408);
- at most ``max_connections`` are open, and never more than the open-file limit less
  ``FD_RESERVE`` (``connection_cap``): a new connection beyond that closes the oldest idle ones
  first (no request in progress), then the oldest still sending a body, never one whose command
  is being carried out. asyncio accepts up to ``ACCEPT_BATCH`` connections at once before any is
  registered; the reserve covers such a burst. A kill's new connection is therefore always
  accepted and answered, and the process never runs out of descriptors because of connections.
"""

from __future__ import annotations

import asyncio
import json
import resource
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

import structlog
from aiohttp import web

from guardd.control.auth import Principal, TokenStore, required_role
from guardd.control.commands import (
    CommandHandler,
    CommandKind,
    ControlCommand,
    HttpRefusedError,
    Role,
    command_from_body,
    http_error_name,
    refusal_record,
)
from guardd.errors import AuthError, CommandError, ConfigError, GuarddError

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "FD_RESERVE",
    "ControlHttpServer",
    "connection_cap",
    "server_ssl_context",
]

log = structlog.get_logger(__name__)

DEFAULT_MAX_BODY_BYTES: Final = 16_384
SHUTDOWN_TIMEOUT_S: Final = 0.5
"""How long a stopping server lets requests in flight finish (the guard stops within 2 s)."""
DEFAULT_MAX_CONNECTIONS: Final = 1024
FD_RESERVE: Final = 256
"""Descriptors kept free of HTTP connections: one burst of accepts (``ACCEPT_BATCH``, taken before
the oldest connections can be closed), the journal, the latch, IB, MQTT, metrics, logs."""
ACCEPT_BATCH: Final = 128
"""The listen backlog, which is also how many connections asyncio accepts in one go."""
_JSON: Final = "application/json"
_REQUEST_ID: Final = web.RequestKey("request_id", str)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def server_ssl_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A TLS server context from a certificate chain and its private key (PEM files)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("control.http.tls_cert_file", f"cannot load TLS cert/key: {exc}") from exc
    return context


def _json(status: int, body: Mapping[str, object], **headers: str) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body, default=str),
        content_type="application/json",
        headers=headers or None,
    )


def _error(
    status: int, error: str, message: str, *, request_id: str, **extra: object
) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="guardd"'} if status == 401 else {}
    body = {"error": error, "message": message, "request_id": request_id, **extra}
    response = _json(status, body, **headers)
    if status in (408, 413):  # a client too slow or too large is not kept for another request
        response.force_close()
    return response


def connection_cap(max_connections: int) -> int:
    """How many HTTP connections may be open: ``max_connections``, and never more than the
    process's open-file limit (RLIMIT_NOFILE, soft) less ``FD_RESERVE``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - FD_RESERVE))


class _Connection(web.RequestHandler):
    """aiohttp's connection handler, answering a request it cannot parse (bad request line or
    header) or one whose handler failed with guardd's JSON error body and a request id instead of
    plain text; ``on_open`` is called once the connection is registered (to enforce the cap: a
    burst of accepts creates every handler before any connection is registered)."""

    def __init__(self, *args: Any, on_open: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_open = on_open

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._on_open()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # an answer is on its way already: give up
            raise ConnectionError("answer already started, cannot send an error")
        request_id = uuid.uuid4().hex
        log.info("http_request_failed", status=status, remote=request.remote, error=repr(exc))
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        name = "unparsable_request" if status == 400 else http_error_name(status)
        response = _error(status, name, phrase, request_id=request_id)
        response.headers["X-Request-Id"] = request_id
        response.force_close()
        return response


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class ControlHttpServer:
    """The HTTP control server, used as ``async with``; ``port`` is the bound port (0 = free)."""

    def __init__(
        self,
        handler: CommandHandler,
        *,
        tokens: TokenStore,
        host: str = "127.0.0.1",
        port: int = 8787,
        ssl: ssl.SSLContext | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 10.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        routes: Iterable[web.AbstractRouteDef] = (),
    ) -> None:
        self._handler = handler
        self._tokens = tokens
        self._host = host
        self._port = port
        self._ssl = ssl
        self._max_body_bytes = max_body_bytes
        self._header_timeout_s = header_timeout_s
        self._body_timeout_s = body_timeout_s
        self._max_connections = max_connections
        self.cap = max_connections  # set from the open-file limit on entering the context
        self.evicted = 0  # connections closed to make room for new ones
        self._evicted_logged = 0.0
        # Connections with a request in progress: still sending its body, or carried out.
        self._busy: dict[web.RequestHandler, Literal["reading", "committed"]] = {}
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._each_request])
        self.app.add_routes(
            [
                web.post("/v1/kill", self._kill),
                web.post("/v1/arm", self._arm),
                web.get("/v1/status", self._status),
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
            ]
        )
        self.app.add_routes(routes)

    @property
    def port(self) -> int:
        """The bound TCP port (after entering the context)."""
        if self._listener is None or not self._listener.sockets:
            raise RuntimeError("the HTTP control server is not running")
        return int(self._listener.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        """Connections open now."""
        runner = self._runner
        if runner is None or runner.server is None:
            return 0
        return sum(1 for c in runner.server.connections if c.transport is not None)

    @property
    def url(self) -> str:
        """The base URL the server answers on."""
        scheme = "https" if self._ssl else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self.port}"

    async def __aenter__(self) -> Self:
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        self.cap = connection_cap(self._max_connections)
        self._runner = runner
        try:
            loop = asyncio.get_running_loop()
            self._listener = await loop.create_server(
                self._accept,
                self._host,
                self._port,
                ssl=self._ssl,
                ssl_handshake_timeout=self._header_timeout_s if self._ssl else None,
                backlog=ACCEPT_BATCH,
                reuse_address=True,
            )
        except BaseException:
            self._runner = None
            await runner.cleanup()
            raise
        log.info(
            "http_control_listening",
            host=self._host,
            port=self.port,
            tls=bool(self._ssl),
            max_connections=self.cap,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            log.info("http_control_stopped")
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None

    # ------------------------------------------------------------------ connections

    def _accept(self) -> web.RequestHandler:
        """A new connection's handler; once registered, room is made for it under the cap."""
        runner = self._runner
        assert runner is not None and runner.server is not None
        server = runner.server
        return _Connection(
            server,
            on_open=lambda: self._make_room(server),
            loop=asyncio.get_running_loop(),
            keepalive_timeout=self._header_timeout_s,
            lingering_time=0,  # a body left unread (refused, too slow): close, do not drain it
            access_log=None,  # None: no access log (as AppRunner)
        )

    def _make_room(self, server: web.Server) -> None:
        """Close the oldest idle connections (then the oldest still sending a body) while more
        than the cap are open; a connection whose command is being carried out stays, and so
        does the newest (the one just opened)."""
        open_now = [c for c in server.connections if c.transport is not None]
        excess = len(open_now) - self.cap
        if excess <= 0:
            return
        older = open_now[:-1]
        idle = [c for c in older if c not in self._busy]
        reading = [c for c in older if self._busy.get(c) == "reading"]
        victims = (idle + reading)[:excess]
        for connection in victims:
            connection.force_close()
        self.evicted += len(victims)
        now = time.monotonic()
        if now - self._evicted_logged >= 1.0:  # a flood of connections: one line a second
            self._evicted_logged = now
            log.warning(
                "http_connections_evicted", evicted=self.evicted, open=len(open_now), cap=self.cap
            )

    @web.middleware
    async def _each_request(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """A request id for every request; errors as JSON; the connection marked busy."""
        request_id = uuid.uuid4().hex
        request[_REQUEST_ID] = request_id
        connection = request.protocol
        self._busy[connection] = "reading"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            name = exc.reason.lower().replace(" ", "_")
            response = _error(exc.status, name, exc.reason, request_id=request_id)
        finally:
            self._busy.pop(connection, None)
        response.headers["X-Request-Id"] = request_id
        return response

    # ------------------------------------------------------------------ routes

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json(200, {"alive": True, "waiting_for": self._handler.waiting_for()})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self._handler.ready()
        waiting_for = self._handler.waiting_for()
        return _json(200 if ready else 503, {"ready": ready, "waiting_for": waiting_for})

    async def _status(self, request: web.Request) -> web.Response:
        try:
            self._authorise(request, "read")
        except HttpRefusedError as refused:
            log.info("status_refused", remote=request.remote, why=str(refused.error))
            return _error(
                refused.status,
                http_error_name(refused.status),
                str(refused.error),
                request_id=request[_REQUEST_ID],
            )
        return _json(200, dict(self._handler.status()))

    async def _kill(self, request: web.Request) -> web.Response:
        return await self._command(request, "kill")

    async def _arm(self, request: web.Request) -> web.Response:
        return await self._command(request, "arm")

    # ------------------------------------------------------------------ commands

    def _authorise(self, request: web.Request, role: Role) -> Principal:
        principal = self._authenticate(request)
        _require(principal, role)
        return principal

    def _authenticate(self, request: web.Request) -> Principal:
        try:
            return self._tokens.authenticate(_bearer(request))
        except AuthError as exc:
            raise HttpRefusedError(401, exc) from exc

    async def _command(self, request: web.Request, action: CommandKind) -> web.Response:
        request_id: str = request[_REQUEST_ID]
        principal: Principal | None = None
        body: object = None
        try:
            principal = self._authenticate(request)
            _require(principal, required_role(action))
            if request.content_type != _JSON:
                why = f"Content-Type must be {_JSON}, not {request.content_type}"
                raise HttpRefusedError(415, CommandError(why))
            body = await _read_json(request, self._max_body_bytes, self._body_timeout_s)
            self._busy[request.protocol] = "committed"  # never evicted from here on
            command = _command_from_body(
                body, action, principal.name, request_id, person=principal.person
            )
        except HttpRefusedError as refused:
            reason = body.get("reason") if isinstance(body, dict) else None
            self._audit_refusal(request, action, principal, reason, refused, request_id)
            return _error(
                refused.status,
                http_error_name(refused.status),
                str(refused.error),
                request_id=request_id,
            )
        try:
            outcome = await self._handler.handle(command)
        except CommandError as exc:
            by_guard = HttpRefusedError(409, exc)
            self._audit_refusal(request, action, principal, command.reason, by_guard, request_id)
            return _error(409, "refused", str(exc), request_id=request_id)
        except GuarddError as exc:  # the guard failed to carry it out (journal, latch): say so
            log.error("command_failed", channel="http", action=action, error=str(exc))
            return _error(500, "command_failed", str(exc), request_id=request_id)
        status, body = outcome.http_answer(
            action=action, principal=principal.name, request_id=request_id
        )
        log.info(
            "command_handled",
            channel="http",
            action=action,
            principal=principal.name,
            accepted=outcome.accepted,
            pending=outcome.pending,
            state=outcome.state,
            request_id=request_id,
        )
        return _json(status, body)

    def _audit_refusal(
        self,
        request: web.Request,
        action: CommandKind,
        principal: Principal | None,
        reason: object,
        refused: HttpRefusedError,
        request_id: str,
    ) -> None:
        record = refusal_record(
            channel="http",
            principal=principal.name if principal else None,
            action=action,
            reason=reason,
            error=refused.error,
            request_id=request_id,
            status=refused.status,
            remote=request.remote,
        )
        log.warning(
            "command_refused",
            channel="http",
            action=action,
            principal=record["principal"],
            status=refused.status,
            why=str(refused.error),
            remote=request.remote,
        )
        try:
            self._handler.audit(record)
        except GuarddError as exc:  # the refusal stands even if the journal is failing
            log.error("refusal_not_journaled", error=str(exc), request_id=request_id)


def _require(principal: Principal, role: Role) -> None:
    try:
        principal.require(role)
    except AuthError as exc:
        raise HttpRefusedError(403, exc) from exc


async def _read_json(request: web.Request, limit: int, timeout_s: float) -> object:
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise HttpRefusedError(413, CommandError(f"body larger than {limit} bytes")) from exc
    except TimeoutError as exc:
        why = f"body not received within {timeout_s:g} s"
        raise HttpRefusedError(408, CommandError(why)) from exc
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise HttpRefusedError(400, CommandError("body is not valid JSON")) from exc


def _command_from_body(
    body: object, action: CommandKind, principal: str, request_id: str, *, person: str | None = None
) -> ControlCommand:
    # The API asks for the reason by name (400); the console checks it as a value (422).
    if isinstance(body, dict) and "reason" not in body:
        raise HttpRefusedError(400, CommandError("missing field: reason"))
    return command_from_body(body, action, principal, request_id, person=person)
