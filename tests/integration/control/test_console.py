"""The web console (guardd.control.console) against the real daemon on the simulated gateway.

- In a real browser: Debian's Chromium (``/usr/bin/chromium``, installed by scripts/bootstrap)
  driven by Playwright, with no browser download. Log in with a role token, see the state, press
  kill (confirm step, reason, mode), see HALTED and the gateway flat, then two people re-arm
  (the pending request visible in between); a read token sees all and may do nothing. A
  screenshot of each state is written to ``tests/artifacts/console/`` (docs/console.md shows
  copies of them from docs/console/).
- Over plain HTTP (aiohttp client): the session cookie's attributes, no token in any URL, and
  the refusals: no session, no or wrong CSRF token, a cross-site POST, a read session's kill.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from guardd.config import Config, parse_config
from guardd.control.console import COOKIE
from guardd.runtime.guard import Guard
from ibsim.bot import RunawayBot
from ibsim.gateway import SimGateway
from tests.conftest import eventually, free_port
from tests.guard_harness import (
    ACCOUNT,
    BASE_TOML,
    GUARD_CLIENT_ID,
    flat,
    journal,
    running_guard,
    sim_gateway,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "console"
BOT_CLIENT_ID = 7


def _token(state_dir: Path, name: str) -> tuple[Path, str]:
    path = state_dir / f"token-{name}"
    token = secrets.token_urlsafe(24)
    path.write_text(token)
    path.chmod(0o600)
    return path, token


def console_config(state_dir: Path, ib_port: int) -> tuple[Config, dict[str, str]]:
    """HTTP control with a read token and a kill token (by role), and two people, alice and
    bob, each with a token of their own that may kill and re-arm; re-arm needs both."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tokens: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for name in ("read", "kill", "alice", "bob"):
        paths[name], tokens[name] = _token(state_dir, name)
    text = BASE_TOML.format(
        account=ACCOUNT, state_dir=state_dir, dry_run="false", port=ib_port,
        client_id=GUARD_CLIENT_ID,
    )  # fmt: skip
    text += f"""
[kill]
mode = "flatten"

[control]
two_person_rearm = true
rearm_window_s = 120

[control.http]
port = {free_port()}

[control.http.token_files]
read = "{paths["read"]}"
kill = "{paths["kill"]}"

[control.people.alice]
http_token_file = "{paths["alice"]}"
http_token_roles = ["kill", "arm"]

[control.people.bob]
http_token_file = "{paths["bob"]}"
http_token_roles = ["kill", "arm"]
"""
    return parse_config(text, source="console test config"), tokens


def console_url(guard: Guard) -> str:
    assert guard.http is not None
    return f"{guard.http.url}/console"


@pytest.fixture
async def sim() -> AsyncIterator[SimGateway]:
    async with sim_gateway() as gateway:
        yield gateway


# ---------------------------------------------------------------------------- in a browser


async def _login(browser: Any, url: str, token: str, **context_args: Any) -> Any:
    context = await browser.new_context(**context_args)
    page = await context.new_page()
    await page.goto(url)
    await page.fill("#token", token)
    await page.click("button[type=submit]")
    await page.wait_for_selector("#state[data-state]:not([data-state=''])")
    assert token not in page.url
    return context, page


async def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def _state(page: Any, state: str) -> None:
    await page.wait_for_selector(f"#state[data-state={state}]", timeout=15_000)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_console_in_chromium_then_login_kill_flat_and_two_people_rearm(
    sim: SimGateway, tmp_path: Path
) -> None:
    assert os.access(CHROMIUM, os.X_OK), "Debian's chromium is missing: run scripts/bootstrap"
    from playwright.async_api import async_playwright

    cfg, tokens = console_config(tmp_path / "state", sim.port)
    bot = RunawayBot("127.0.0.1", sim.port, BOT_CLIENT_ID)
    async with running_guard(cfg) as guard, async_playwright() as pw:
        await bot.connect()
        try:
            bot.place_limit("AAPL", "BUY", 100, 150.0)
            bot.place_limit("MSFT", "BUY", 10, 300.0)
            await eventually(lambda: guard.book.working_order_count == 2, "bot orders")
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            url = console_url(guard)

            # Arrange: the login page, then a read-only operator on a phone-sized screen.
            page0 = await (await browser.new_context()).new_page()
            await page0.goto(url)
            assert await page0.is_visible("#token")
            await _shot(page0, "login")
            _reader, read_page = await _login(
                browser, url, tokens["read"], viewport={"width": 390, "height": 844}
            )
            await _state(read_page, "ARMED")
            assert await read_page.is_visible("#readonly")
            assert not await read_page.is_visible("#kill")
            await read_page.wait_for_selector("#orders h3:has-text('client 7')")
            await _shot(read_page, "armed-read-only-phone")

            # Act: alice logs in, sees ARMED with the positions and the bot's orders, kills.
            alice, alice_page = await _login(browser, url, tokens["alice"])
            await _state(alice_page, "ARMED")
            await alice_page.wait_for_selector("#positions td:has-text('AAPL')")
            await alice_page.wait_for_selector("#orders h3:has-text('client 7 (2)')")
            cookies = {c["name"]: c for c in await alice.cookies()}
            assert cookies[COOKIE]["httpOnly"] and cookies[COOKIE]["sameSite"] == "Strict"
            await _shot(alice_page, "armed")
            await alice_page.click("#kill")
            assert await alice_page.is_visible("#kill-confirm")  # the confirm step
            await alice_page.fill("#kill-reason", "runaway bot on the console")
            await alice_page.check("input[name=mode][value=flatten]")
            await _shot(alice_page, "kill-confirm")
            await alice_page.click("#kill-go")

            # Assert: HALTED in both browsers, the gateway flat with no order working.
            await _state(alice_page, "HALTED")
            await _state(read_page, "HALTED")
            await eventually(
                lambda: flat(sim) and not sim.exchange.working_orders(),
                "the gateway flat with no working order",
                timeout_s=20,
            )
            await alice_page.wait_for_selector("#positions td:has-text('flat')", timeout=15_000)
            await alice_page.wait_for_selector("#orders p:has-text('none working')")
            await alice_page.wait_for_selector("#why:has-text('runaway bot on the console')")
            await _shot(alice_page, "halted-flat")
            await _shot(read_page, "halted-read-only-phone")

            # Two people re-arm: alice's arm is pending (visible to all), bob's confirms.
            await alice_page.fill("#arm-reason", "bot fixed")
            await alice_page.click("#arm-go")
            await alice_page.wait_for_selector("#result:has-text('pending by alice')")
            _bob, bob_page = await _login(browser, url, tokens["bob"])
            await bob_page.wait_for_selector("#rearm-pending:has-text('pending by alice')")
            await _shot(bob_page, "rearm-pending")
            await bob_page.fill("#arm-reason", "checked with alice")
            await bob_page.click("#arm-go")
            await _state(bob_page, "ARMED")
            await _state(alice_page, "ARMED")
            await _shot(bob_page, "rearmed")
            await browser.close()
        finally:
            await bot.disconnect()
    commands = [r for r in journal(cfg) if r["kind"] == "command"]
    assert [(c["action"], c["person"], c["accepted"], c["pending"]) for c in commands] == [
        ("kill", "alice", True, False),
        ("arm", "alice", False, True),
        ("arm", "bob", True, False),
    ]
    assert commands[0]["mode"] == "flatten"


# ---------------------------------------------------------------------------- over HTTP


def _client() -> aiohttp.ClientSession:
    # unsafe: keep cookies of an IP-address host (the guard listens on 127.0.0.1)
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def _session(http: aiohttp.ClientSession, url: str, token: str) -> str:
    """Log in with ``token``; returns the page's CSRF token."""
    async with http.post(f"{url}/login", data={"token": token}, allow_redirects=False) as r:
        assert r.status == 303
        assert r.headers["Location"] == "/console"
        set_cookie = r.headers["Set-Cookie"]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/console"):
        assert attribute in set_cookie
    async with http.get(url) as r:
        page = await r.text()
    assert token not in page
    marker = 'name="csrf-token" content="'
    return page.split(marker, 1)[1].split('"', 1)[0]


@pytest.mark.timeout(60)
async def test_console_commands_without_session_csrf_or_role_then_refused_and_nothing_changes(
    sim: SimGateway, tmp_path: Path
) -> None:
    cfg, tokens = console_config(tmp_path / "state", sim.port)
    async with running_guard(cfg) as guard:
        url = console_url(guard)
        kill = {"reason": "test", "mode": "cancel"}
        async with _client() as anonymous:
            async with anonymous.post(f"{url}/kill", json=kill) as r:
                assert r.status == 401
            async with anonymous.get(f"{url}/view") as r:
                assert r.status == 401
            async with anonymous.get(url) as r:
                assert 'name="token"' in await r.text()  # the login form
            async with anonymous.post(
                f"{url}/login", data={"token": "wrong-token-0123456789"}, allow_redirects=False
            ) as r:
                assert r.status == 303 and r.headers["Location"] == "/console?failed=1"
        async with _client() as reader:
            csrf = await _session(reader, url, tokens["read"])
            async with reader.get(f"{url}/view") as r:
                view = await r.json()
            assert view["state"] == "ARMED" and view["you"]["may_kill"] is False
            async with reader.post(f"{url}/kill", json=kill, headers={"X-CSRF-Token": csrf}) as r:
                assert r.status == 403
        async with _client() as alice:
            csrf = await _session(alice, url, tokens["alice"])
            async with alice.post(f"{url}/kill", json=kill) as r:
                assert r.status == 403  # no CSRF token
            async with alice.post(f"{url}/kill", json=kill, headers={"X-CSRF-Token": "x"}) as r:
                assert r.status == 403  # a wrong one
            cross_site = {"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"}
            async with alice.post(f"{url}/kill", json=kill, headers=cross_site) as r:
                assert r.status == 403
            other_origin = {"X-CSRF-Token": csrf, "Origin": "https://evil.example"}
            async with alice.post(f"{url}/kill", json=kill, headers=other_origin) as r:
                assert r.status == 403
            assert guard.engine.state == "ARMED"
            async with alice.post(f"{url}/kill", json=kill, headers={"X-CSRF-Token": csrf}) as r:
                assert r.status == 200, await r.text()
            assert guard.engine.state == "HALTED"
            async with alice.post(f"{url}/logout", headers={"X-CSRF-Token": csrf}) as r:
                assert r.status == 200
            async with alice.get(f"{url}/view") as r:
                assert r.status == 401  # the session is gone
    records = journal(cfg)
    refused = [r for r in records if r["kind"] == "command_refused"]
    # every refusal accounted for: the first of each kind in full, the rest as counts
    summed = [r for r in records if r["kind"] == "command_refusals_aggregated"]
    assert len(refused) + sum(r["total"] for r in summed) >= 6
    assert {r.get("via") for r in refused} == {"console"}


@pytest.mark.timeout(60)
async def test_console_events_then_stream_sends_the_view_again_when_the_state_changes(
    sim: SimGateway, tmp_path: Path
) -> None:
    cfg, tokens = console_config(tmp_path / "state", sim.port)
    async with running_guard(cfg) as guard, _client() as http:
        url = console_url(guard)
        csrf = await _session(http, url, tokens["kill"])
        async with http.get(f"{url}/events") as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            states: list[str] = []

            async def read_states() -> None:
                import json

                async for line in stream.content:
                    if line.startswith(b"data: "):
                        states.append(json.loads(line[6:])["state"])
                        if states[-1] == "HALTED":
                            return

            reader = asyncio.create_task(read_states())
            await eventually(lambda: bool(states), "the first view")
            kill = {"reason": "stream test", "mode": "cancel"}
            async with http.post(f"{url}/kill", json=kill, headers={"X-CSRF-Token": csrf}) as r:
                assert r.status == 200
            await asyncio.wait_for(reader, 10)
        assert states[0] == "ARMED" and states[-1] == "HALTED"


@pytest.mark.timeout(90)
async def test_demo_then_prints_the_console_url_and_serves_it_while_it_stays() -> None:
    import io
    import re

    from guardd.demo import run_demo

    out = io.StringIO()
    stay = asyncio.Event()
    demo = asyncio.create_task(run_demo(out, stay=stay))
    try:
        await eventually(lambda: "stays up" in out.getvalue() or demo.done(), timeout_s=60)
        found = re.search(
            r"console\s+(http://\S+/console)\s+\(log in with the token in (\S+)", out.getvalue()
        )
        assert found, out.getvalue()
        url = found.group(1)
        token = (await asyncio.to_thread(Path(found.group(2)).read_text)).strip()
        async with _client() as http:
            csrf = await _session(http, url, token)
            async with http.get(f"{url}/view") as r:
                view = await r.json()
        assert csrf and view["state"] == "HALTED" and view["position_list"] == []
    finally:
        stay.set()
        assert await asyncio.wait_for(demo, 30) == 0
