"""guardctl against a real HTTP control server and a real mosquitto; docs/control.md's shell
examples run as written."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from guardd.control.auth import KeyStore, TokenStore, TwoPersonRule
from guardd.control.guardctl import main
from guardd.control.http import ControlHttpServer
from guardd.control.mqtt import MqttControl
from tests.mqtt_broker import Broker, MemoryHandler, free_port, mqtt_broker

__all__ = ["mqtt_broker"]  # fixture used by name

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "control.md"
ACCOUNT = "DU000001"
KILL_TOKEN = "kill-token-0123456789"
READ_TOKEN = "read-token-0123456789"
ALICE_KEY = "alice-secret-key-0123456789"


@pytest.fixture(autouse=True)
def _no_credentials_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GUARDD_TOKEN", "GUARDD_KEY", "GUARDD_URL", "GUARDD_MQTT_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


def secret_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


async def guardctl(*argv: str) -> int:
    """Run guardctl in a thread (it runs its own event loop) while the servers run in ours."""
    return await asyncio.to_thread(main, list(argv))


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@dataclass
class Http:
    handler: MemoryHandler
    url: str
    kill_token: str
    read_token: str


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[Http]:
    handler = MemoryHandler()
    tokens = TokenStore.from_tokens(
        {"ops-kill": (KILL_TOKEN, ["kill"]), "ops-read": (READ_TOKEN, ["read"])}
    )
    async with ControlHttpServer(handler, tokens=tokens, port=0) as server:
        yield Http(
            handler,
            server.url,
            secret_file(tmp_path, "kill.token", KILL_TOKEN),
            secret_file(tmp_path, "read.token", READ_TOKEN),
        )


def mqtt_guard(handler: MemoryHandler, broker: Broker, account: str = ACCOUNT) -> MqttControl:
    return MqttControl(
        handler,
        account=account,
        keys=KeyStore.from_secrets({"alice": (ALICE_KEY, ["kill", "arm"])}),
        host=broker.host,
        port=broker.port,
        client_id=f"guardd-{account}",
        backoff_min_s=0.05,
        state_interval_s=0.05,
    )


def mqtt_args(broker: Broker, *extra: str) -> list[str]:
    return ["--via", "mqtt", "--mqtt-host", broker.host, "--mqtt-port", str(broker.port), *extra]


# ---------------------------------------------------------------------------------- HTTP


async def test_kill_over_http_then_exit_0_and_halted(
    http: Http, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await guardctl(
        "kill", "--reason", "runaway bot", "--mode", "flatten", "--url", http.url,
        "--token-file", http.kill_token,
    )  # fmt: skip

    assert code == 0
    assert http.handler.state == "HALTED"
    assert http.handler.handled[0].mode == "flatten"
    assert "accepted: state HALTED" in capsys.readouterr().out


async def test_token_from_env_then_used(http: Http, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDD_TOKEN", KILL_TOKEN)

    code = await guardctl("kill", "--reason", "env token", "--url", http.url)

    assert code == 0
    assert http.handler.state == "HALTED"


async def test_read_token_on_kill_then_exit_1_with_reason(
    http: Http, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await guardctl(
        "kill", "--reason", "x", "--url", http.url, "--token-file", http.read_token
    )

    assert code == 1
    assert http.handler.state == "ARMED"
    assert "refused (403)" in capsys.readouterr().err


async def test_no_token_anywhere_then_exit_2_and_nothing_sent(
    http: Http, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await guardctl("kill", "--reason", "x", "--url", http.url)

    assert code == 2
    assert "GUARDD_TOKEN" in capsys.readouterr().err
    assert http.handler.audited == []


async def test_token_file_readable_by_others_then_exit_2_and_nothing_sent(
    http: Http, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chmod(http.kill_token, 0o644)

    code = await guardctl(
        "kill", "--reason", "x", "--url", http.url, "--token-file", http.kill_token
    )

    assert code == 2
    assert "open to others (mode 0644)" in capsys.readouterr().err
    assert http.handler.audited == [] and http.handler.handled == []


async def test_blank_reason_then_exit_2_and_nothing_sent(http: Http) -> None:
    code = await guardctl(
        "kill", "--reason", " ", "--url", http.url, "--token-file", http.kill_token
    )

    assert code == 2
    assert http.handler.audited == [] and http.handler.handled == []


async def test_bad_mode_then_argparse_exit_2(http: Http) -> None:
    with pytest.raises(SystemExit) as exited:
        await guardctl("kill", "--reason", "x", "--mode", "nuke", "--url", http.url)

    assert exited.value.code == 2


async def test_status_over_http_then_exit_0_and_json(
    http: Http, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await guardctl("status", "--url", http.url, "--token-file", http.read_token)

    assert code == 0
    assert '"state": "ARMED"' in capsys.readouterr().out


async def test_arm_pending_second_operator_then_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = MemoryHandler(state="HALTED", two_person=TwoPersonRule(window_s=60))
    tokens = TokenStore.from_tokens({"alice": ("arm-token-0123456789ab", ["arm"])})
    async with ControlHttpServer(handler, tokens=tokens, port=0) as server:
        token = secret_file(tmp_path, "arm.token", "arm-token-0123456789ab")
        code = await guardctl("arm", "--reason", "ok", "--url", server.url, "--token-file", token)

    assert code == 3
    assert handler.state == "HALTED"
    assert "pending" in capsys.readouterr().err


async def test_nothing_listening_then_exit_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = secret_file(tmp_path, "kill.token", KILL_TOKEN)
    url = f"http://127.0.0.1:{free_port()}"

    code = await guardctl("kill", "--reason", "x", "--url", url, "--token-file", token)

    assert code == 4
    assert "no answer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- MQTT


async def test_kill_over_mqtt_then_exit_0_and_halted(
    mqtt_broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = MemoryHandler()
    key = secret_file(tmp_path, "alice.key", ALICE_KEY)
    async with mqtt_guard(handler, mqtt_broker) as guard:
        await eventually(lambda: guard.connected)

        code = await guardctl(
            "kill", *mqtt_args(mqtt_broker, "--account", ACCOUNT, "--key-id", "alice",
                               "--key-file", key), "--reason", "runaway bot",
        )  # fmt: skip

    assert code == 0
    assert handler.state == "HALTED"
    assert handler.handled[0].principal == "alice"
    assert "accepted: state HALTED" in capsys.readouterr().out


async def test_wrong_key_over_mqtt_then_exit_1_refused_and_unchanged(
    mqtt_broker: Broker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = MemoryHandler()
    monkeypatch.setenv("GUARDD_KEY", "not-alices-key-0123456789")
    async with mqtt_guard(handler, mqtt_broker) as guard:
        await eventually(lambda: guard.connected)

        code = await guardctl(
            "kill", *mqtt_args(mqtt_broker, "--account", ACCOUNT, "--key-id", "alice"),
            "--reason", "x",
        )  # fmt: skip

    assert code == 1
    assert handler.state == "ARMED"
    assert "bad signature" in capsys.readouterr().err
    assert handler.audited[0]["error"] == "AuthError"


async def test_fleet_kill_over_mqtt_then_every_guard_halted(
    mqtt_broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = MemoryHandler(), MemoryHandler()
    key = secret_file(tmp_path, "alice.key", ALICE_KEY)
    async with (
        mqtt_guard(first, mqtt_broker, "DU000001") as a,
        mqtt_guard(second, mqtt_broker, "DU000002") as b,
    ):
        await eventually(lambda: a.connected and b.connected)

        code = await guardctl(
            "kill", *mqtt_args(mqtt_broker, "--account", "all", "--key-id", "alice",
                               "--key-file", key, "--timeout", "1"), "--reason", "firm-wide",
        )  # fmt: skip

    assert code == 0
    assert (first.state, second.state) == ("HALTED", "HALTED")
    out = capsys.readouterr().out
    assert "DU000001: state HALTED" in out and "DU000002: state HALTED" in out


async def test_status_over_mqtt_then_retained_state_and_offline_after_exit(
    mqtt_broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = MemoryHandler(state="HALTED")
    async with mqtt_guard(handler, mqtt_broker) as guard:
        await eventually(lambda: guard.connected)
        await asyncio.sleep(0.1)  # the retained state is published after connecting

        online = await guardctl("status", *mqtt_args(mqtt_broker, "--account", ACCOUNT))
        assert '"state": "HALTED"' in capsys.readouterr().out

    offline = await guardctl("status", *mqtt_args(mqtt_broker, "--account", ACCOUNT))

    assert online == 0
    assert offline == 1
    assert "offline" in capsys.readouterr().err


async def test_mqtt_without_account_then_exit_2(mqtt_broker: Broker) -> None:
    code = await guardctl("kill", *mqtt_args(mqtt_broker), "--reason", "x")

    assert code == 2


# ------------------------------------------------------------------ the documented shell examples


def doc_example(name: str) -> str:
    """The first ```sh block after ``<!-- example: name`` in docs/control.md."""
    text = DOC.read_text()
    after = text[text.index(f"<!-- example: {name}") :]
    return after.split("```sh\n", 1)[1].split("```", 1)[0]


def require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed; the documented example needs them "
            "(apt-get install -y openssl mosquitto-clients curl)",
            pytrace=False,
        )


async def run_shell(script: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash", "-euo", "pipefail", "-c", script,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode or 0, out.decode()


async def test_documented_openssl_mosquitto_pub_kill_then_halted(mqtt_broker: Broker) -> None:
    require_tools("openssl", "mosquitto_pub", "bash")
    handler = MemoryHandler()
    env = {
        "KEY_ID": "alice",
        "KEY": ALICE_KEY,
        "ACCOUNT": ACCOUNT,
        "MQTT_HOST": mqtt_broker.host,
        "MQTT_PORT": str(mqtt_broker.port),
    }
    async with mqtt_guard(handler, mqtt_broker) as guard:
        await eventually(lambda: guard.connected)

        code, out = await run_shell(doc_example("mqtt-kill"), env)
        assert code == 0, out
        await eventually(lambda: handler.state == "HALTED")

    assert handler.audited == []
    [command] = handler.handled
    assert (command.principal, command.reason, command.channel) == ("alice", "runaway bot", "mqtt")


async def test_documented_curl_kill_then_halted(http: Http) -> None:
    require_tools("curl", "bash")

    code, out = await run_shell(
        doc_example("http-kill"), {"GUARDD_URL": http.url, "GUARDD_TOKEN": KILL_TOKEN}
    )

    assert code == 0, out
    assert '"accepted": true' in out
    assert http.handler.state == "HALTED"
    assert http.handler.handled[0].mode == "cancel"
