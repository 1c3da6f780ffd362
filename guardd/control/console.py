"""The web console: the operator's page on the guard's own HTTP server (no process of its own).

One page at ``/console``, server-rendered, with one small vendored script and style sheet
(``guardd/control/static/``, shipped in the wheel; nothing is fetched from elsewhere). It shows
the state (why, since when), every rule's value against its levels, positions, working orders
by client, the close in progress, connectivity and the last journal records, refreshed live by
server-sent events; a kill button (confirm step, reason, mode) and re-arm, with the two-person
re-arm's pending request (who, until when) in view.

Routes (mounted on ``ControlHttpServer.app`` by ``Console.attach``):

=============================  =========================================================
``GET  /console``              the page (the login form without a session)
``POST /console/login``        form field ``token``: a role token; sets the session cookie
``POST /console/logout``       ends the session
``GET  /console/view``         the view as JSON
``GET  /console/events``       server-sent events: ``view`` whenever the view changes
``POST /console/kill``         JSON ``{"reason", "mode"?}`` (kill role)
``POST /console/arm``          JSON ``{"reason", "force"?}`` (arm role)
``GET  /console/static/<f>``   the vendored script and style sheet
=============================  =========================================================

Security: a login exchanges a role token (read / kill / arm, the same ``TokenStore`` as the
bearer API) for a random session id in a cookie that is ``HttpOnly``, ``SameSite=Strict``,
``Path=/console`` and ``Secure`` under TLS; the token is never put in a URL or the page, and the
server keeps only the session. Every POST must come from the page itself: a ``Sec-Fetch-Site``
other than ``same-origin`` (or an ``Origin`` other than the server's) is refused, and kill, arm
and logout carry the session's CSRF token in an ``X-CSRF-Token`` header (a header a cross-site
form cannot set). A read token sees everything and can do nothing; the server checks the role
of every command, whatever the page shows. A content security policy allows only the server's
own script and style, no framing. Commands go through ``CommandHandler.handle`` like every
other channel (journaled, two-person rule, refusals audited through ``CommandHandler.audit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import math
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Final, Protocol

import structlog
from aiohttp import web

from guardd.control.auth import Principal, TokenStore, required_role
from guardd.control.commands import (
    CommandHandler,
    CommandKind,
    HttpRefusedError,
    command_from_body,
    http_error_name,
    refusal_record,
)
from guardd.errors import AuthError, CommandError, GuarddError

__all__ = ["COOKIE", "Console", "ConsoleHandler", "Session", "Sessions"]

log = structlog.get_logger(__name__)

COOKIE: Final = "guardd_session"
CSRF_HEADER: Final = "X-CSRF-Token"
SESSION_TTL_S: Final = 12 * 3600.0
MAX_SESSIONS: Final = 64
MAX_STREAMS: Final = 32
REFRESH_S: Final = 0.25
KEEPALIVE_S: Final = 15.0
_STATIC: Final = {"console.js": "text/javascript", "console.css": "text/css"}
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" makes a form POST's Origin "null"
    "Cache-Control": "no-store",
}


class ConsoleHandler(CommandHandler, Protocol):
    """The guard's side of the console: the command seam plus what the page shows."""

    def console_view(self) -> Mapping[str, object]:
        """The console's view of the guard, JSON-able (see ``Guard.console_view``)."""
        ...


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in operator: who, the CSRF token their page sends back, and when it ends."""

    principal: Principal
    csrf: str
    expires: float  # monotonic seconds


class Sessions:
    """Console sessions in memory (a restart logs everyone out), at most ``max_sessions``: a new
    login beyond that ends the oldest session."""

    def __init__(
        self,
        *,
        ttl_s: float = SESSION_TTL_S,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, principal: Principal) -> tuple[str, Session]:
        """A new session for ``principal``: (its id for the cookie, the session)."""
        self._expire()
        while len(self._sessions) >= self._max:
            del self._sessions[next(iter(self._sessions))]  # oldest first (insertion order)
        sid = secrets.token_urlsafe(32)
        session = Session(principal, secrets.token_urlsafe(32), self._clock() + self._ttl_s)
        self._sessions[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        """The live session with this id, or None."""
        if not sid:
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._sessions[sid]
            return None
        return session

    def close(self, sid: str) -> None:
        """End a session (logout)."""
        self._sessions.pop(sid, None)

    def _expire(self) -> None:
        now = self._clock()
        for sid in [sid for sid, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[sid]


class Console:
    """The web console's routes; ``attach`` mounts them on an aiohttp application."""

    def __init__(
        self,
        handler: ConsoleHandler,
        *,
        tokens: TokenStore,
        secure_cookie: bool = False,
        sessions: Sessions | None = None,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self._handler = handler
        self._tokens = tokens
        self._secure = secure_cookie
        self._sessions = sessions if sessions is not None else Sessions()
        self._refresh_s = refresh_s
        self._closing = asyncio.Event()
        self._streams = 0

    def attach(self, app: web.Application) -> None:
        """Add the console's routes to ``app`` (before it starts); its streams end on shutdown."""
        app.add_routes(
            [
                web.get("/console", self._page),
                web.post("/console/login", self._login),
                web.post("/console/logout", self._logout),
                web.get("/console/view", self._view),
                web.get("/console/events", self._events),
                web.post("/console/kill", self._kill),
                web.post("/console/arm", self._arm),
                web.get("/console/static/{name}", self._static),
            ]
        )
        app.on_shutdown.append(self._on_shutdown)

    async def _on_shutdown(self, app: web.Application) -> None:
        self._closing.set()

    # ------------------------------------------------------------------ pages

    async def _page(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session is None:
            return _html(_login_page(request.query.get("failed") == "1"))
        return _html(_console_page(session))

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        content_type = _STATIC.get(name)
        if content_type is None:
            raise web.HTTPNotFound()
        body = resources.files("guardd.control").joinpath("static", name).read_bytes()
        return web.Response(
            body=body,
            content_type=content_type,
            charset="utf-8",
            headers={**_SECURITY_HEADERS, "Cache-Control": "no-cache"},
        )

    async def _login(self, request: web.Request) -> web.Response:
        try:
            _same_origin(request)
        except HttpRefusedError as refused:
            return _refusal_json(refused, "")
        form = await request.post()
        token = form.get("token")
        try:
            principal = self._tokens.authenticate(token if isinstance(token, str) else None)
        except AuthError as exc:
            log.warning("console_login_refused", remote=request.remote, why=str(exc))
            self._audit(request, None, "console_login", None, HttpRefusedError(401, exc), "")
            return _see_other("/console?failed=1")
        sid, _ = self._sessions.open(principal)
        log.info("console_login", principal=principal.name, person=principal.person)
        response = _see_other("/console")
        response.set_cookie(
            COOKIE,
            sid,
            path="/console",
            httponly=True,
            samesite="Strict",
            secure=self._secure,
            max_age=int(SESSION_TTL_S),
        )
        return response

    async def _logout(self, request: web.Request) -> web.Response:
        try:
            session, sid = self._authorised(request)
        except HttpRefusedError as refused:
            return _refusal_json(refused, "")
        self._sessions.close(sid)
        log.info("console_logout", principal=session.principal.name)
        response = _json(200, {"logged_out": True})
        response.del_cookie(COOKIE, path="/console")
        return response

    # ------------------------------------------------------------------ the view

    def _view_of(self, session: Session) -> dict[str, object]:
        principal = session.principal
        return {
            **self._handler.console_view(),
            "you": {
                "name": principal.name,
                "person": principal.person,
                "may_kill": principal.may("kill"),
                "may_arm": principal.may("arm"),
            },
        }

    async def _view(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session is None:
            return _json(401, {"error": "unauthorized", "message": "log in at /console"})
        return _json(200, self._view_of(session))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        sid = request.cookies.get(COOKIE, "")
        if session is None:
            return _json(401, {"error": "unauthorized", "message": "log in at /console"})
        if self._streams >= MAX_STREAMS:
            return _json(503, {"error": "busy", "message": "too many open console streams"})
        response = web.StreamResponse(
            headers={
                **_SECURITY_HEADERS,
                "Content-Type": "text/event-stream",
                "X-Accel-Buffering": "no",
            }
        )
        self._streams += 1
        try:
            await response.prepare(request)
            last = ""
            quiet_since = time.monotonic()
            while not self._closing.is_set() and self._sessions.get(sid) is not None:
                text = _dumps(self._view_of(session))
                if text != last:
                    await response.write(f"event: view\ndata: {text}\n\n".encode())
                    last, quiet_since = text, time.monotonic()
                elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                    await response.write(b": keepalive\n\n")
                    quiet_since = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self._refresh_s)
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        finally:
            self._streams -= 1
        return response

    # ------------------------------------------------------------------ commands

    async def _kill(self, request: web.Request) -> web.Response:
        return await self._command(request, "kill")

    async def _arm(self, request: web.Request) -> web.Response:
        return await self._command(request, "arm")

    async def _command(self, request: web.Request, action: CommandKind) -> web.Response:
        request_id = uuid.uuid4().hex
        principal: Principal | None = None
        body: object = None
        try:
            session, _ = self._authorised(request)
            principal = session.principal
            _require(principal, action)
            body = await _read_json(request)
            command = command_from_body(
                body, action, principal.name, request_id, person=principal.person
            )
        except HttpRefusedError as refused:
            reason = body.get("reason") if isinstance(body, dict) else None
            self._audit(request, principal, action, reason, refused, request_id)
            return _refusal_json(refused, request_id)
        try:
            outcome = await self._handler.handle(command)
        except CommandError as exc:
            by_guard = HttpRefusedError(409, exc)
            self._audit(request, principal, action, command.reason, by_guard, request_id)
            return _refusal_json(by_guard, request_id)
        except GuarddError as exc:
            log.error("command_failed", channel="console", action=action, error=str(exc))
            return _json(
                500, {"error": "command_failed", "message": str(exc), "request_id": request_id}
            )
        status, body = outcome.http_answer(
            action=action, principal=principal.name, request_id=request_id
        )
        log.info(
            "command_handled",
            channel="console",
            action=action,
            principal=principal.name,
            accepted=outcome.accepted,
            pending=outcome.pending,
            state=outcome.state,
            request_id=request_id,
        )
        return _json(status, body)

    # ------------------------------------------------------------------ sessions

    def _session(self, request: web.Request) -> Session | None:
        return self._sessions.get(request.cookies.get(COOKIE))

    def _authorised(self, request: web.Request) -> tuple[Session, str]:
        """The session of a state-changing request, checked for origin and CSRF token."""
        _same_origin(request)
        sid = request.cookies.get(COOKIE, "")
        session = self._sessions.get(sid)
        if session is None:
            raise HttpRefusedError(401, AuthError("no console session: log in at /console"))
        sent = request.headers.get(CSRF_HEADER, "")
        if not secrets.compare_digest(sent.encode(), session.csrf.encode()):
            raise HttpRefusedError(403, AuthError("missing or wrong CSRF token"))
        return session, sid

    def _audit(
        self,
        request: web.Request,
        principal: Principal | None,
        action: str,
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
            via="console",
        )
        log.warning(
            "command_refused",
            channel="console",
            action=action,
            principal=record["principal"],
            status=refused.status,
            why=str(refused.error),
        )
        try:
            self._handler.audit(record)
        except GuarddError as exc:  # the refusal stands even if the journal is failing
            log.error("refusal_not_journaled", error=str(exc), request_id=request_id)


def _same_origin(request: web.Request) -> None:
    """Refuse a state-changing request another site made the browser send."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        why = f"cross-site request refused (Sec-Fetch-Site {site})"
        raise HttpRefusedError(403, AuthError(why))
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise HttpRefusedError(403, AuthError(f"request from another origin refused ({origin})"))


def _require(principal: Principal, action: CommandKind) -> None:
    try:
        principal.require(required_role(action))
    except AuthError as exc:
        raise HttpRefusedError(403, exc) from exc


async def _read_json(request: web.Request) -> object:
    if request.content_type != "application/json":
        raise HttpRefusedError(415, CommandError("the body must be application/json"))
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise HttpRefusedError(413, CommandError("body too large")) from exc
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise HttpRefusedError(400, CommandError("body is not valid JSON")) from exc


def _refusal_json(refused: HttpRefusedError, request_id: str) -> web.Response:
    return _json(
        refused.status,
        {
            "error": http_error_name(refused.status),
            "message": str(refused.error),
            "request_id": request_id,
        },
    )


def _plain(value: object) -> object:
    """JSON-able data with non-finite floats as null (a browser's JSON.parse has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _dumps(value: object) -> str:
    return json.dumps(_plain(value), default=str, allow_nan=False, separators=(",", ":"))


def _json(status: int, body: Mapping[str, object]) -> web.Response:
    return web.Response(
        status=status,
        text=_dumps(body),
        content_type="application/json",
        headers=_SECURITY_HEADERS,
    )


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={**_SECURITY_HEADERS, "Location": location})


def _html(text: str) -> web.Response:
    return web.Response(
        text=text, content_type="text/html", charset="utf-8", headers=_SECURITY_HEADERS
    )


_HEAD: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>guardd console</title>
<link rel="stylesheet" href="/console/static/console.css">
"""


def _login_page(failed: bool) -> str:
    error = '<p class="error" role="alert">That token is not known.</p>' if failed else ""
    return f"""{_HEAD}</head>
<body class="login">
<main>
<h1>guardd</h1>
<form method="post" action="/console/login" autocomplete="off">
<label for="token">Role token (read, kill or arm)</label>
<input id="token" name="token" type="password" required autofocus>
<button type="submit">Log in</button>
{error}
</form>
</main>
</body>
</html>
"""


def _console_page(session: Session) -> str:
    principal = session.principal
    who = html.escape(principal.person or principal.name)
    roles = html.escape(",".join(sorted(principal.roles)))
    return f"""{_HEAD}<meta name="csrf-token" content="{html.escape(session.csrf)}">
<script src="/console/static/console.js" defer></script>
</head>
<body data-may-kill="{str(principal.may("kill")).lower()}"
      data-may-arm="{str(principal.may("arm")).lower()}">
<header>
<div id="state" class="state" data-state="">…</div>
<div class="who">{who} <span class="roles">({roles})</span>
<button id="logout" type="button" class="link">Log out</button></div>
</header>
<main>
<section id="summary">
<p id="why"></p>
<p id="since"></p>
<p id="stream" class="muted">connecting…</p>
</section>
<section id="actions">
<div id="kill-box" hidden>
<button id="kill" type="button" class="kill">KILL</button>
<form id="kill-confirm" hidden>
<label for="kill-reason">Reason</label>
<input id="kill-reason" maxlength="500" required>
<fieldset><legend>Mode</legend>
<label><input type="radio" name="mode" value="flatten" checked> cancel and flatten</label>
<label><input type="radio" name="mode" value="cancel"> cancel orders only</label>
</fieldset>
<button id="kill-go" type="submit" class="kill">Confirm kill</button>
<button id="kill-cancel" type="button">Back</button>
</form>
</div>
<div id="arm-box" hidden>
<p id="rearm-pending" hidden></p>
<form id="arm-form">
<label for="arm-reason">Re-arm reason</label>
<input id="arm-reason" maxlength="500" required>
<label><input id="arm-force" type="checkbox"> force (a kill-level breach still holds)</label>
<button id="arm-go" type="submit">Re-arm</button>
</form>
</div>
<p id="readonly" hidden>Read-only: this token may look, not act.</p>
<p id="result" role="status"></p>
</section>
<section><h2>Connectivity</h2><dl id="connectivity"></dl></section>
<section><h2>Close in progress</h2><p id="close">none</p></section>
<section><h2>Rules</h2>
<table id="rules"><thead><tr><th>rule</th><th>value</th><th>warn</th><th>reduce</th>
<th>kill</th><th>level</th></tr></thead><tbody></tbody></table></section>
<section><h2>Positions</h2>
<table id="positions"><thead><tr><th>symbol</th><th>type</th><th>quantity</th>
<th>avg cost</th></tr></thead><tbody></tbody></table></section>
<section><h2>Working orders</h2><div id="orders"></div></section>
<section><h2>Journal (latest first)</h2><ul id="journal"></ul></section>
</main>
</body>
</html>
"""
