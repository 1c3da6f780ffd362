"""The `guardd` command line: check-config (the config and every credential it names), and `run`
refusing what it cannot guard with one line and an exit code systemd does not restart."""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from guardd import __version__
from guardd.cli import main
from guardd.errors import EX_CONFIG, EX_STARTUP
from ibsim.gateway import SimGateway
from tests.drill_helpers import write_run_config

ROOT = Path(__file__).resolve().parents[3]


async def guardd(*args: str, timeout_s: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "guardd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_demo_config_then_check_config_ok() -> None:
    code, out, _ = await guardd("check-config", str(ROOT / "configs" / "demo.toml"))
    assert code == 0
    assert "ok" in out


def test_example_config_without_the_units_credentials_then_78_naming_the_token_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The example names the unit's credentials (/run/credentials/guardd.service/...), which
    # exist only while the unit runs: check-config reads them, so here they are missing.
    code = main(["check-config", str(ROOT / "configs" / "guardd.example.toml")])

    assert code == EX_CONFIG
    assert "control.http.token_files.read: cannot read" in capsys.readouterr().err


def test_example_config_with_its_credentials_present_then_check_config_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (ROOT / "configs" / "guardd.example.toml").read_text()
    for name in (
        "token-read",
        "token-kill",
        "token-arm",
        "mqtt-key-alice",
        "mqtt-key-bob",
        "notify-ops-key",
    ):
        (tmp_path / name).write_text(secrets.token_hex(16))
        (tmp_path / name).chmod(0o600)  # secrets are private files
    (tmp_path / "notify-phone-url").write_text("tgram://123456789:abcdefghijklmnopqrstuvwxyz/12345")
    (tmp_path / "notify-phone-url").chmod(0o600)
    config = tmp_path / "guardd.toml"
    config.write_text(text.replace("/run/credentials/guardd.service", str(tmp_path)))

    code = main(["check-config", str(config)])

    assert code == 0, capsys.readouterr().err
    assert "ok" in capsys.readouterr().out


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A self-signed certificate and its key (PEM): the HTTP TLS pair, and the MQTT CA."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert.read_bytes(), key.read_bytes()


def credential_config(
    tmp_path: Path, certificate: tuple[bytes, bytes], *, broken: str, how: str
) -> Path:
    """A config naming one credential file of each kind (HTTP tokens, TLS pair, MQTT password,
    operator key, MQTT CA); the one under `broken` is missing, or a directory (unreadable)."""
    files = {
        "control.http.token_files.read": tmp_path / "token-read",
        "control.http.token_files.kill": tmp_path / "token-kill",
        "control.http.token_files.arm": tmp_path / "token-arm",
        "control.http.tls_cert_file": tmp_path / "tls.crt",
        "control.http.tls_key_file": tmp_path / "tls.key",
        "control.mqtt.password_file": tmp_path / "mqtt-password",
        "control.mqtt.operator_key_files.alice": tmp_path / "mqtt-key-alice",
        "control.mqtt.tls_ca_file": tmp_path / "mqtt-ca.pem",
    }
    cert, key = certificate
    contents = {
        "control.http.tls_cert_file": cert,
        "control.http.tls_key_file": key,
        "control.mqtt.tls_ca_file": cert,
    }
    for key, path in files.items():
        if key == broken:
            if how == "unreadable":
                path.mkdir()
            continue
        path.write_bytes(contents.get(key, secrets.token_hex(16).encode()))
        path.chmod(0o600)  # secrets are private files
    config = tmp_path / "guardd.toml"
    config.write_text(
        f"""
account = "DU1"
state_dir = "{tmp_path / "state"}"
[ib]
client_id = 0
[control.http]
tls_cert_file = "{files["control.http.tls_cert_file"]}"
tls_key_file = "{files["control.http.tls_key_file"]}"
[control.http.token_files]
read = "{files["control.http.token_files.read"]}"
kill = "{files["control.http.token_files.kill"]}"
arm = "{files["control.http.token_files.arm"]}"
[control.mqtt]
enabled = true
username = "guardd"
password_file = "{files["control.mqtt.password_file"]}"
tls = true
tls_ca_file = "{files["control.mqtt.tls_ca_file"]}"
[control.mqtt.operator_key_files]
alice = "{files["control.mqtt.operator_key_files.alice"]}"
"""
    )
    return config


@pytest.mark.parametrize("how", ["missing", "unreadable"])
@pytest.mark.parametrize(
    "key",
    [
        "control.http.token_files.read",
        "control.http.token_files.kill",
        "control.http.token_files.arm",
        "control.http.tls_cert_file",
        "control.http.tls_key_file",
        "control.mqtt.password_file",
        "control.mqtt.operator_key_files.alice",
        "control.mqtt.tls_ca_file",
    ],
)
def test_credential_file_missing_or_unreadable_then_check_config_78_naming_its_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    certificate: tuple[bytes, bytes],
    key: str,
    how: str,
) -> None:
    config = credential_config(tmp_path, certificate, broken=key, how=how)

    code = main(["check-config", str(config)])

    assert code == EX_CONFIG
    err = capsys.readouterr().err
    assert f"{key}: cannot read" in err
    assert not (tmp_path / "state").exists()  # nothing started


def test_every_credential_readable_then_check_config_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], certificate: tuple[bytes, bytes]
) -> None:
    config = credential_config(tmp_path, certificate, broken="", how="missing")

    code = main(["check-config", str(config)])

    assert code == 0, capsys.readouterr().err


def test_heartbeats_with_mqtt_disabled_then_check_config_78_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "guardd.toml"
    config.write_text(
        'account = "DU1"\nstate_dir = "s"\n[ib]\nclient_id = 0\n'
        '[limits.heartbeats.bots.momentum]\ntimeout_s = 15.0\naction = "kill"\n'
    )

    code = main(["check-config", str(config)])

    assert code == EX_CONFIG
    assert "limits.heartbeats.bots: " in capsys.readouterr().err


async def test_bad_config_then_check_config_78_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('account = "DU1"\nstate_dir = "s"\n[ib]\nclient_id = "zero"\n')
    code, _, err = await guardd("check-config", str(bad))
    assert code == 78
    assert "ib.client_id" in err


@pytest.mark.integration
async def test_account_not_managed_by_the_login_then_run_exits_78(
    sim: SimGateway, tmp_path: Path
) -> None:
    config, _, _ = write_run_config(tmp_path / "state", sim.port)
    text = config.read_text().replace('account = "DU000001"', 'account = "DU999999"')
    config.write_text(text)
    code, _, err = await guardd("run", "-c", str(config), "--fresh-start")
    assert code == 78
    assert "DU999999 is not managed by this login" in err
    assert sim.received_by_id.get(58, 0) == 0  # nothing was cancelled on someone else's login


@pytest.mark.integration
async def test_missing_token_file_then_run_exits_78_before_connecting_to_ib(
    sim: SimGateway, tmp_path: Path
) -> None:
    config, _, _ = write_run_config(tmp_path / "state", sim.port)
    (tmp_path / "state" / "token-kill").unlink()

    code, _, err = await guardd("run", "-c", str(config), "--fresh-start")

    assert code == EX_CONFIG
    assert "control.http.token_files.kill: cannot read" in err
    assert "Traceback" not in err
    assert sim.received_by_client == {}  # nothing connected to IB


@pytest.mark.integration
async def test_control_port_in_use_then_one_line_and_exit_71_without_traceback(
    sim: SimGateway, tmp_path: Path
) -> None:
    config, url, _ = write_run_config(tmp_path / "state", sim.port)
    port = int(url.rsplit(":", 1)[1])
    with socket.create_server(("127.0.0.1", port)):  # someone else holds the control port
        code, _, err = await guardd("run", "-c", str(config), "--fresh-start")

    assert code == EX_STARTUP
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"guardd: control.http: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in lines[0]
    assert "Traceback" not in err
    assert sim.received_by_client == {}  # it stopped before connecting to IB


@pytest.mark.integration
async def test_state_dir_not_writable_then_one_line_and_exit_71(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    config, _, _ = write_run_config(tmp_path / "state", 1)
    config.write_text(
        config.read_text().replace(
            f'state_dir = "{tmp_path / "state"}"', f'state_dir = "{blocker}"'
        )
    )

    code, _, err = await guardd("run", "-c", str(config), "--fresh-start")

    assert code == EX_STARTUP
    assert len(err.strip().splitlines()) == 1, err
    assert str(blocker) in err
    assert "Traceback" not in err


def test_version_then_the_package_version_and_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])

    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"guardd {__version__}"


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf", "soon"])
def test_sim_show_every_not_a_positive_number_of_seconds_then_refused_with_exit_2(
    seconds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["sim", "--show-every", seconds])

    assert exited.value.code == 2
    assert "argument --show-every:" in capsys.readouterr().err


def relative_credentials_config(tmp_path: Path) -> Path:
    """A config naming its token files relatively, as a unit with LoadCredential= would."""
    config = tmp_path / "guardd.toml"
    config.write_text(
        f'account = "DU1"\nstate_dir = "{tmp_path / "state"}"\n[ib]\nclient_id = 0\n'
        '[control.http.token_files]\nread = "token-read"\nkill = "token-kill"\narm = "token-arm"\n'
    )
    return config


def test_relative_credentials_in_credentials_directory_then_check_config_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = relative_credentials_config(tmp_path)
    credentials = tmp_path / "credentials"  # stands in for /run/credentials/guardd.service
    credentials.mkdir()
    for role in ("read", "kill", "arm"):
        (credentials / f"token-{role}").write_text(secrets.token_hex(16))
        (credentials / f"token-{role}").chmod(0o600)
    monkeypatch.chdir(tmp_path)  # not found relative to the working directory
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))

    code = main(["check-config", str(config)])

    assert code == 0, capsys.readouterr().err


def test_relative_credentials_without_credentials_directory_then_78_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = relative_credentials_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)

    code = main(["check-config", str(config)])

    assert code == EX_CONFIG
    assert "control.http.token_files.read: cannot read" in capsys.readouterr().err


# ---- shell completion ---------------------------------------------------------------------------


def bash_completes(script: str, words: list[str]) -> list[str]:
    """What bash offers for `words` (the last one being completed) with `script` sourced."""
    command = words[0]
    quoted = " ".join(f"'{w}'" for w in words)
    call = f'_shtab_{command} {command} "{words[-1]}" "{words[-2]}"'
    program = (
        f"source /dev/stdin; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
        f'{call}; printf "%s\\n" "${{COMPREPLY[@]}}"'
    )
    done = subprocess.run(
        ["bash", "-c", program], input=script, capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def test_completion_bash_then_a_script_bash_completes_every_subcommand_with(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out

    offered = bash_completes(script, ["guardd", ""])
    assert offered == ["run", "init", "check-config", "demo", "sim", "completion"]
    assert "--fresh-start" in bash_completes(script, ["guardd", "run", "--f"])
    assert bash_completes(script, ["guardd", "sim", "--sh"]) == ["--show-every"]


def test_guardctl_completion_bash_then_subcommands_and_options_completed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from guardd.control.guardctl import main as guardctl_main

    assert guardctl_main(["completion", "bash"]) == 0
    script = capsys.readouterr().out

    assert bash_completes(script, ["guardctl", ""]) == ["kill", "arm", "status", "completion"]
    assert bash_completes(script, ["guardctl", "kill", "--mo"]) == ["--mode"]


def test_completion_zsh_then_a_zsh_script_naming_the_subcommands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["completion", "zsh"]) == 0
    script = capsys.readouterr().out

    assert script.startswith("#compdef guardd")
    for command in ("run", "init", "check-config", "demo", "sim"):
        assert f"    {command}:'" in script  # listed with its help
