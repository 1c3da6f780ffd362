"""Notifications: the guard's notices (`guardd.core.notices`) to people's phones and chats.

Two kinds of target, configured under ``[notify]`` (docs/notifications.md):

- a plain JSON webhook: an HTTP POST of the notice as JSON, signed with HMAC-SHA256 (`sign`):
  header ``X-Guardd-Timestamp`` (Unix seconds) and ``X-Guardd-Signature``
  (``sha256=<hex of HMAC(key, timestamp + "." + body)>``); a receiver checks it with `verify`;
- an apprise URL (Slack, Telegram, email, ntfy, generic JSON...), sent by apprise in a thread
  of the target's own (apprise is synchronous).

Never in the kill's way: the guard calls `Notifications.publish` after a decision's actions are
out; `publish` is synchronous, does no I/O and never raises: it checks the per-kind rate limit,
builds the body, and appends it to each interested target's bounded queue (full: the oldest
is dropped, and counted). One task per target (`_send_loop`) sends from its queue, each
notice tried ``attempts`` times under the retry policy (`guardd.retry`), ``timeout_s`` per try. A
target that fails or hangs delays only its own later notices. Counted in metrics by kind:
``guardd_notifications_sent_total``, ``_failed_total`` (every try failed), ``_dropped_total``
(``reason`` rate_limited or queue_full). Notices still queued when the guard stops are not sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import structlog

from guardd import __version__
from guardd.config import NotifyConfig
from guardd.core.notices import Notice, RateLimit
from guardd.errors import GuarddError
from guardd.metrics import Metrics
from guardd.retry import Backoff, RetryPolicy

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "DeliveryError",
    "Notifications",
    "Target",
    "apprise_for",
    "notice_body",
    "sign",
    "verify",
]

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Guardd-Signature"
TIMESTAMP_HEADER = "X-Guardd-Timestamp"
SIGNATURE_TOLERANCE_S = 300
"""How old a signed webhook may be when a receiver checks it (`verify`'s default)."""


class DeliveryError(GuarddError):
    """A notification did not reach its target (one try): tried again, then counted."""


@dataclass(frozen=True, slots=True)
class Target:
    """One configured target with its secrets read: a webhook (``key``: its HMAC key) or an
    apprise URL; `kinds` is which notices it gets."""

    name: str
    channel: Literal["webhook", "apprise"]
    url: str
    kinds: frozenset[str]
    key: bytes | None = None

    def __repr__(self) -> str:  # the URL may carry a token, the key is a secret
        return f"Target(name={self.name!r}, channel={self.channel!r})"


def sign(key: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Guardd-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 under `key` of the
    timestamp (decimal Unix seconds, as in ``X-Guardd-Timestamp``), a ".", and the body."""
    mac = hmac.new(key, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    key: bytes,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    now: float,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
) -> bool:
    """What a receiver does with a webhook: the signature matches the body and timestamp
    under `key` (compared in constant time), and the timestamp is within `tolerance_s` of
    `now`. (A receiver also drops a body whose ``id`` it has seen: a retry sends it again.)"""
    if timestamp is None or signature is None or not timestamp.isdecimal():
        return False
    ts = int(timestamp)
    if abs(now - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(key, ts, body), signature)


def notice_body(notice: Notice, *, account: str, status: Mapping[str, object]) -> dict[str, Any]:
    """A notice as the webhook's JSON (and the text apprise sends): id, kind, account, time,
    title, message, resolved, details, and the guard's status when it was published."""
    return {
        "id": uuid.uuid4().hex,
        "kind": notice.kind,
        "account": account,
        "ts": notice.ts,
        "title": notice.title,
        "message": notice.message,
        "resolved": notice.resolved,
        "details": dict(notice.details),
        "status": dict(status),
        "guardd_version": __version__,
    }


def apprise_for(url: str) -> Any:
    """An ``apprise.Apprise`` holding `url`; ValueError when apprise does not take the URL."""
    import apprise  # imported when a target uses it: it loads its plugins

    sender = apprise.Apprise()
    if not sender.add(url):
        raise ValueError("apprise does not recognise this URL (scheme or form)")
    return sender


@dataclass(slots=True)
class _Queued:
    kind: str
    body: dict[str, Any]


class _Outbox:
    """One target's bounded queue and the event its send loop waits on."""

    def __init__(self, target: Target, size: int) -> None:
        self.target = target
        self.items: deque[_Queued] = deque()
        self.size = size
        self.wake = asyncio.Event()
        self.apprise: Any = None
        self.pool: ThreadPoolExecutor | None = None


class Notifications:
    """The notification sender: `publish` from anywhere on the loop, `run` as one task."""

    def __init__(
        self,
        targets: Iterable[Target],
        cfg: NotifyConfig,
        *,
        account: str,
        metrics: Metrics,
        status: Callable[[], Mapping[str, object]] = dict,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.account = account
        self.metrics = metrics
        self.status = status
        self.clock = clock
        self.rate_limit = RateLimit(cfg.rate_limit_count, cfg.rate_limit_window_s)
        self._retry = RetryPolicy(cfg.retry_backoff_s, cfg.retry_backoff_max_s)
        self._outboxes = [_Outbox(t, cfg.queue_size) for t in targets]
        metrics.init_notifications((o.target.name, o.target.kinds) for o in self._outboxes)

    @property
    def targets(self) -> tuple[Target, ...]:
        """The configured targets."""
        return tuple(o.target for o in self._outboxes)

    def queued(self, target: str) -> int:
        """Notices waiting in `target`'s queue (not the one being sent)."""
        return next((len(o.items) for o in self._outboxes if o.target.name == target), 0)

    def publish(self, notice: Notice) -> None:
        """Queue `notice` for every target that wants its kind; never blocks, never raises.

        Over the kind's rate limit it is dropped (counted ``rate_limited``); a target whose
        queue is full drops its oldest notice to make room (counted ``queue_full``)."""
        try:
            wanted = [o for o in self._outboxes if notice.kind in o.target.kinds]
            if not wanted:
                return
            if not self.rate_limit.allow(notice.kind, notice.ts):
                self.metrics.count_notification_dropped(notice.kind, "rate_limited")
                log.warning("notification_rate_limited", kind=notice.kind, title=notice.title)
                return
            body = notice_body(notice, account=self.account, status=self.status())
            for outbox in wanted:
                if len(outbox.items) >= outbox.size:
                    dropped = outbox.items.popleft()
                    self.metrics.count_notification_dropped(dropped.kind, "queue_full")
                    log.warning(
                        "notification_dropped",
                        target=outbox.target.name,
                        kind=dropped.kind,
                        why="queue_full",
                    )
                outbox.items.append(_Queued(notice.kind, body))
                outbox.wake.set()
        except Exception as exc:  # a notice must never break the decision that published it
            log.exception("notification_publish_failed", kind=notice.kind, error=str(exc))

    async def run(self) -> None:
        """Send every queued notice, one loop per target, until cancelled."""
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                async with asyncio.TaskGroup() as tasks:
                    for outbox in self._outboxes:
                        tasks.create_task(
                            self._send_loop(outbox, session), name=f"notify_{outbox.target.name}"
                        )
            finally:
                for outbox in self._outboxes:
                    if outbox.pool is not None:
                        # A hung apprise call finishes on its own timeout; nobody waits for it.
                        outbox.pool.shutdown(wait=False, cancel_futures=True)
                        outbox.pool = None

    async def _send_loop(self, outbox: _Outbox, session: aiohttp.ClientSession) -> None:
        target = outbox.target
        while True:
            if not outbox.items:
                outbox.wake.clear()
                await outbox.wake.wait()
                continue
            item = outbox.items.popleft()
            try:
                await self._deliver(outbox, session, item)
            except Exception as exc:  # every try failed: counted, and the next notice goes
                self.metrics.count_notification_failed(item.kind, target.name)
                log.warning(
                    "notification_failed",
                    target=target.name,
                    channel=target.channel,
                    kind=item.kind,
                    attempts=self.cfg.attempts,
                    error=str(exc) or type(exc).__name__,
                )
            else:
                self.metrics.count_notification_sent(item.kind, target.name)
                log.info("notification_sent", target=target.name, kind=item.kind)

    async def _deliver(
        self, outbox: _Outbox, session: aiohttp.ClientSession, item: _Queued
    ) -> None:
        backoff = Backoff(self._retry)
        while True:
            try:
                if outbox.target.channel == "webhook":
                    await self._post_webhook(outbox.target, session, item)
                else:
                    await self._send_apprise(outbox, item)
                return
            except DeliveryError:
                if backoff.attempts + 1 >= self.cfg.attempts:
                    raise
            await backoff.sleep()

    async def _post_webhook(
        self, target: Target, session: aiohttp.ClientSession, item: _Queued
    ) -> None:
        assert target.key is not None
        body = json.dumps(item.body, separators=(",", ":"), allow_nan=False).encode()
        now = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"guardd/{__version__}",
            TIMESTAMP_HEADER: str(now),
            SIGNATURE_HEADER: sign(target.key, now, body),
        }
        try:
            # Not redirected: a signed notice goes where it was configured to, or fails.
            async with session.post(
                target.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if response.status >= 300:
                    raise DeliveryError(f"HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(_failure(exc, target.url)) from exc

    async def _send_apprise(self, outbox: _Outbox, item: _Queued) -> None:
        if outbox.apprise is None:
            try:
                outbox.apprise = apprise_for(outbox.target.url)
            except ValueError as exc:
                raise DeliveryError(str(exc)) from exc
        if outbox.pool is None:
            outbox.pool = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"notify-{outbox.target.name}"
            )
        body = item.body
        title = f"guardd {self.account}: {body['title']}"
        text = body["message"]
        loop = asyncio.get_running_loop()
        sender = outbox.apprise
        timeout_s = self.cfg.timeout_s

        def send() -> bool:
            return bool(
                sender.notify(
                    body=text,
                    title=title,
                    notify_type=_apprise_type(item.kind, bool(body["resolved"])),
                    timeout=timeout_s,
                )
            )

        future = loop.run_in_executor(outbox.pool, send)
        try:
            delivered = await asyncio.wait_for(future, timeout=timeout_s + 1.0)
        except TimeoutError as exc:
            raise DeliveryError("apprise timed out") from exc
        except Exception as exc:
            raise DeliveryError(f"apprise failed: {exc}") from exc
        if not delivered:
            raise DeliveryError("apprise reported failure")


def _failure(exc: BaseException, url: str) -> str:
    """What a failed webhook try says (logged): never the target's URL, which may carry a token
    (aiohttp names the URL in an invalid-URL error and in a response error)."""
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid URL"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} ({type(exc).__name__})"
    return str(exc).replace(url, "<url>") or type(exc).__name__


def _apprise_type(kind: str, resolved: bool) -> str:
    """apprise's notification type (its icon and colour) for a notice."""
    if resolved or kind in ("flat_confirmed", "rearm"):
        return "success"
    if kind in ("warn", "reduce"):
        return "warning"
    return "failure"
