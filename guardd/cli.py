"""The `guardd` command line: run the guard, check a config, write a starter deployment (`init`),
the demo, the simulated gateway, and a shell completion script (`completion bash`).

SIGHUP reloads the limits of `guardd run` from its config file (`Guard.reload`): checked first,
refused and named when the file is bad or changes a key outside [limits].

Exit codes of `guardd run` (see guardd/errors.py): 0 stopped on request (SIGTERM / SIGINT, in
any phase), 78 a config or credential error, 71 a start-up error (a port in use, a state
directory that cannot be written), each printed as one line on stderr; 69 / 74 / 70 errors after
start-up. The systemd units do not restart 78 and 71. `guardd sim` exits 78 on a bad scenario and
65 on a `--state` file it cannot read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from guardd import __version__
from guardd.completion import (
    add_completion_command,
    complete_directories,
    complete_files,
    script,
)
from guardd.errors import EX_CONFIG, ConfigError, GuarddError, StartupError
from ibsim import cli as sim_cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="guard an IB account")
    complete_files(
        run.add_argument("-c", "--config", type=Path, required=True, help="guardd TOML file")
    )
    run.add_argument(
        "--fresh-start",
        action="store_true",
        help="start ARMED when the latch file is missing (first start only; an unreadable "
        "latch still starts HALTED)",
    )
    run.add_argument(
        "--wire-logs",
        action="store_true",
        help="log every TWS API message ibapi sends and receives (as [log] wire = true)",
    )
    init = sub.add_parser(
        "init",
        help="write a starter config and the files a deployment needs into DIR (never overwrites)",
    )
    complete_directories(init.add_argument("directory", type=Path, metavar="DIR"))
    check = sub.add_parser("check-config", help="validate a config file and exit")
    complete_files(check.add_argument("config", type=Path))
    demo = sub.add_parser("demo", help="guard the embedded simulated gateway against a runaway bot")
    demo.add_argument(
        "--stay",
        action="store_true",
        help="keep the gateway, the guard and its web console running after the demo (Ctrl-C)",
    )
    demo.add_argument(
        "--server-version",
        type=sim_cli.server_version,
        help="highest TWS API server version the embedded gateway offers (default 226)",
    )
    sim_cli.add_arguments(sub.add_parser("sim", help="run the simulated IB Gateway"))
    add_completion_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a `guardd` subcommand and return its exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "completion":
        print(script(parser, args.shell), end="")
        return 0
    if args.command == "sim":
        return sim_cli.run(args, prog="guardd sim")
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "init":
        from guardd.shipped import init_main

        return init_main(args.directory)
    if args.command == "run":
        return _run(args.config, fresh_start=args.fresh_start, wire_logs=args.wire_logs)
    if args.command == "demo":
        from guardd.demo import demo_main

        return demo_main(stay=args.stay, server_version=args.server_version)
    raise AssertionError(f"unhandled command {args.command}")


def _check_config(path: Path) -> int:
    """Load the config and read every credential file it names (as `run` does first)."""
    from guardd.config import load_config
    from guardd.credentials import load_credentials

    try:
        cfg = load_config(path, credentials_directory=os.environ.get("CREDENTIALS_DIRECTORY"))
        load_credentials(cfg)
    except ConfigError as exc:
        print(f"guardd: {path}: {exc}", file=sys.stderr)
        return EX_CONFIG
    print(
        f"{path}: ok (account {cfg.account}, IB {cfg.ib.host}:{cfg.ib.port}, kill {cfg.kill.mode})"
    )
    return 0


def import_structlog() -> None:
    """Import structlog without rich, as a production install has it.

    structlog imports rich at its own import when rich is installed (a development environment
    has it through import-linter; guardd does not depend on it): with pygments, 0.03 s of CPU
    byte-compiled (0.17 s compiled from source) of the guard's 0.5 s. The guard renders its
    tracebacks without rich in any case (`guardd.logs`), so its log lines do not depend on what
    else is installed. A no-op once structlog or rich is imported."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` raises ImportError
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


def _run(path: Path, *, fresh_start: bool, wire_logs: bool = False) -> int:
    import_structlog()  # before anything imports it
    from guardd.config import load_config
    from guardd.logs import configure_logging

    try:
        cfg = load_config(path, credentials_directory=os.environ.get("CREDENTIALS_DIRECTORY"))
    except ConfigError as exc:
        print(f"guardd: {path}: {exc}", file=sys.stderr)
        return EX_CONFIG
    configure_logging(
        cfg.log.format,
        cfg.log.level,
        wire=cfg.log.wire or wire_logs,
        journal_stream=os.environ.get("JOURNAL_STREAM"),
    )
    try:
        return asyncio.run(_guard(cfg, fresh_start=fresh_start, path=path))
    except GuarddError as exc:
        # One line, no traceback: the line names what to fix (a key, a port, a path).
        print(f"guardd: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return exc.exit_code


async def _guard(cfg: object, *, fresh_start: bool, path: Path) -> int:
    from guardd.config import Config, load_config
    from guardd.runtime.guard import Guard
    from guardd.sdnotify import Notifier

    assert isinstance(cfg, Config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        guard = Guard.open(cfg, fresh_start=fresh_start, notifier=Notifier.from_env())
    except ConfigError:
        raise
    except (GuarddError, OSError) as exc:  # the state directory, the latch, the journal
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        raise StartupError(f"cannot start: {detail}{where}") from exc

    def read_again() -> Config:
        return load_config(path, credentials_directory=os.environ.get("CREDENTIALS_DIRECTORY"))

    # SIGHUP (systemctl reload): the limits again from the same file, checked before they count.
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, guard.reload, read_again, str(path))
    await guard.run(stop)
    return 0
