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
malformed JSON or a missing field, 401 no or unknown token, 403 wrong role, 413 body over
``max_body_bytes``, 422 valid JSON with invalid values; 404 / 405 as aiohttp gives them. A refused
command changes nothing and is journaled through ``handler.audit``. Others add routes (``/metrics``)
with ``routes=`` or through ``server.app`` before entering the context.
"""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import structlog
from aiohttp import web

from guardd.control.auth import Principal, Role, TokenStore, required_role
from guardd.control.commands import (
    Action,
    CommandHandler,
    ControlCommand,
    check_force,
    check_mode,
    check_reason,
    refusal_record,
)
from guardd.errors import AuthError, CommandError, ConfigError, GuarddError

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ControlHttpServer", "server_ssl_context"]

log = structlog.get_logger(__name__)

DEFAULT_MAX_BODY_BYTES: Final = 16_384
SHUTDOWN_TIMEOUT_S: Final = 0.5
"""How long a stopping server lets requests in flight finish (the guard stops within 2 s)."""
_FIELDS: Final[Mapping[Action, frozenset[str]]] = {
    "kill": frozenset({"reason", "mode"}),
    "arm": frozenset({"reason", "force"}),
}
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


def _error(status: int, error: str, message: str, **extra: object) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="guardd"'} if status == 401 else {}
    return _json(status, {"error": error, "message": message, **extra}, **headers)


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class _RefusedError(Exception):
    """Internal: a command refused with this HTTP status (never leaves this module)."""

    def __init__(self, status: int, error: GuarddError) -> None:
        super().__init__(str(error))
        self.status = status
        self.error = error


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
        routes: Iterable[web.AbstractRouteDef] = (),
    ) -> None:
        self._handler = handler
        self._tokens = tokens
        self._host = host
        self._port = port
        self._ssl = ssl
        self._max_body_bytes = max_body_bytes
        self._runner: web.AppRunner | None = None
        self.app = web.Application(
            client_max_size=max_body_bytes, middlewares=[self._errors_as_json]
        )
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
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the HTTP control server is not running")
        return int(self._runner.addresses[0][1])

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
        try:
            site = web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("http_control_listening", host=self._host, port=self.port, tls=bool(self._ssl))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            log.info("http_control_stopped")

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)

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
        except _RefusedError as refused:
            log.info("status_refused", remote=request.remote, why=str(refused.error))
            return _error(refused.status, _error_name(refused.status), str(refused.error))
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
            raise _RefusedError(401, exc) from exc

    async def _command(self, request: web.Request, action: Action) -> web.Response:
        request_id = uuid.uuid4().hex
        principal: Principal | None = None
        body: object = None
        try:
            principal = self._authenticate(request)
            _require(principal, required_role(action))
            body = await _read_json(request, self._max_body_bytes)
            command = _command_from_body(
                body, action, principal.name, request_id, person=principal.person
            )
        except _RefusedError as refused:
            reason = body.get("reason") if isinstance(body, dict) else None
            self._audit_refusal(request, action, principal, reason, refused, request_id)
            return _error(
                refused.status,
                _error_name(refused.status),
                str(refused.error),
                request_id=request_id,
            )
        try:
            outcome = await self._handler.handle(command)
        except CommandError as exc:
            by_guard = _RefusedError(409, exc)
            self._audit_refusal(request, action, principal, command.reason, by_guard, request_id)
            return _error(409, "refused", str(exc), request_id=request_id)
        except GuarddError as exc:  # the guard failed to carry it out (journal, latch): say so
            log.error("command_failed", channel="http", action=action, error=str(exc))
            return _error(500, "command_failed", str(exc), request_id=request_id)
        status = 200 if outcome.accepted else 202 if outcome.pending else 409
        extra: dict[str, object] = {}
        if not outcome.latch_durable:
            # Carried out, but a restart would not know it: an error the operator must see.
            status, extra = 500, {"error": "latch_not_durable"}
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
        return _json(
            status,
            {
                **outcome.as_json(),
                **extra,
                "action": action,
                "principal": principal.name,
                "request_id": request_id,
            },
        )

    def _audit_refusal(
        self,
        request: web.Request,
        action: Action,
        principal: Principal | None,
        reason: object,
        refused: _RefusedError,
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
        raise _RefusedError(403, exc) from exc


def _error_name(status: int) -> str:
    return {
        400: "malformed",
        401: "unauthorized",
        403: "forbidden",
        409: "refused",
        413: "too_large",
        422: "invalid",
    }.get(status, "error")


async def _read_json(request: web.Request, limit: int) -> object:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise _RefusedError(413, CommandError(f"body larger than {limit} bytes")) from exc
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _RefusedError(400, CommandError("body is not valid JSON")) from exc


def _command_from_body(
    body: object, action: Action, principal: str, request_id: str, *, person: str | None = None
) -> ControlCommand:
    if not isinstance(body, dict):
        raise _RefusedError(400, CommandError("body must be a JSON object"))
    if "reason" not in body:
        raise _RefusedError(400, CommandError("missing field: reason"))
    try:
        unknown = sorted(str(k) for k in body if k not in _FIELDS[action])
        if unknown:
            raise CommandError(f"unknown field(s) for {action}: {', '.join(unknown)}")
        return ControlCommand(
            action=action,
            principal=principal,
            channel="http",
            reason=check_reason(body["reason"]),
            mode=check_mode(body.get("mode")),
            force=check_force(body.get("force")),
            request_id=request_id,
            person=person,
        )
    except CommandError as exc:
        raise _RefusedError(422, exc) from exc
