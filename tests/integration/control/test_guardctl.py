"""guardctl against a real HTTP control server and a real mosquitto; docs/control.md's shell
examples run as written."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import guardd
from guardd.control.auth import KeyStore, TokenStore, TwoPersonRule
from guardd.control.guardctl import describe_status, main
from guardd.control.http import ControlHttpServer
from guardd.control.mqtt import MqttControl
from guardd.retry import RetryPolicy
from tests.conftest import eventually, free_port
from tests.control_harness import doc_example, guardctl, require_tools, run_shell
from tests.mqtt_broker import Broker, MemoryHandler

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


def printed_json(out: str) -> object:
    """The JSON document guardctl printed (the servers' log lines share captured stdout)."""
    lines = out.splitlines()
    start, end = lines.index("{"), len(lines) - lines[::-1].index("}")
    return json.loads("\n".join(lines[start:end]))


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
        reconnect=RetryPolicy(0.05, 30.0),
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


async def test_status_over_http_then_exit_0_and_a_summary_for_a_person(
    http: Http, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await guardctl("status", "--url", http.url, "--token-file", http.read_token)

    assert code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "ARMED"
    assert "{" not in out


async def test_status_json_over_http_then_the_guards_document(
    http: Http, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await guardctl("status", "--json", "--url", http.url, "--token-file", http.read_token)

    assert code == 0
    assert printed_json(capsys.readouterr().out) == {"state": "ARMED", "commands": 0}


async def test_kill_json_then_the_answer_as_json_and_exit_0(
    http: Http, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await guardctl(
        "kill", "--json", "--reason", "x", "--url", http.url, "--token-file", http.kill_token
    )

    assert code == 0
    answer = printed_json(capsys.readouterr().out)
    assert isinstance(answer, dict)
    assert (answer["accepted"], answer["state"], answer["http_status"]) == (True, "HALTED", 200)


async def test_refused_kill_json_then_json_on_stdout_and_exit_1(
    http: Http, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await guardctl(
        "kill", "--json", "--reason", "x", "--url", http.url, "--token-file", http.read_token
    )

    assert code == 1
    answer = printed_json(capsys.readouterr().out)
    assert isinstance(answer, dict)
    assert (answer["http_status"], answer["error"]) == (403, "forbidden")


async def test_no_answer_json_then_an_error_document_and_exit_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = secret_file(tmp_path, "kill.token", KILL_TOKEN)
    url = f"http://127.0.0.1:{free_port()}"

    code = await guardctl("arm", "--json", "--reason", "x", "--url", url, "--token-file", token)

    assert code == 4
    answer = printed_json(capsys.readouterr().out)
    assert isinstance(answer, dict) and "no answer" in answer["error"]


def test_version_then_the_package_version_and_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])

    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"guardctl {guardd.__version__}"


def test_describe_status_of_a_halted_guard_then_state_why_ib_book_close_and_findings() -> None:
    status = {
        "account": "DU1", "state": "HALTED", "online": True, "ib_connected": True,
        "synced": True, "can_act": True, "ib_read_only": False, "latch_durable": False,
        "latch_error": "disk full", "positions": 2, "working_orders": 0,
        "net_liquidation": 1000000.0,
        "latch": {"reason": "runaway bot", "source": "http", "principal": "alice",
                  "mode": "flatten", "since": 0.0, "decision_id": "d-1"},
        "close": {"kind": "flatten", "round": 1, "children": 3, "at_target": False,
                  "overdue": True},
        "findings": {"leverage": {"level": "kill", "value": 3.1, "message": "leverage 3.1"}},
    }  # fmt: skip

    lines = describe_status(status).splitlines()

    assert lines[0] == "DU1: HALTED: http by alice: runaway bot (mode flatten)"
    assert "connected" in lines[1]
    assert "NOT DURABLE: disk full" in lines[2]
    assert "2 positions, 0 working orders, net liquidation 1,000,000.00" in lines[3]
    assert "flatten in progress, OVERDUE (round 1, 3 closing orders)" in lines[4]
    assert lines[5].split() == ["kill", "leverage:", "leverage", "3.1"]


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
        assert "HALTED" in capsys.readouterr().out.splitlines()  # a line of its own

    offline = await guardctl("status", *mqtt_args(mqtt_broker, "--account", ACCOUNT))
    assert "offline" in capsys.readouterr().err
    offline_json = await guardctl("status", "--json", *mqtt_args(mqtt_broker, "--account", ACCOUNT))

    assert online == 0
    assert offline == offline_json == 1
    assert printed_json(capsys.readouterr().out) == {
        "state": "HALTED",
        "commands": 0,
        "online": False,
    }


async def test_mqtt_without_account_then_exit_2(mqtt_broker: Broker) -> None:
    code = await guardctl("kill", *mqtt_args(mqtt_broker), "--reason", "x")

    assert code == 2


# ------------------------------------------------------------------ the documented shell examples


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
