"""The simulated gateway's command line: `ibsim` (and `python -m ibsim`), and the arguments and
exit codes of `guardd sim`, which is a thin command over this module.

Exit codes: 0 stopped on request, 78 (EX_CONFIG) a scenario it cannot use, 65 (EX_DATAERR) a
`--state` file it cannot read; each printed as one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import shtab

__all__ = ["EX_CONFIG", "EX_DATAERR", "add_arguments", "main", "run"]

EX_CONFIG = 78  # a scenario the gateway cannot use
EX_DATAERR = 65  # `--state FILE`: FILE is not a state this gateway reads


def add_arguments(sim: argparse.ArgumentParser) -> None:
    """The options of the simulated gateway, on `sim` (`ibsim` itself or `guardd sim`)."""
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    sim.add_argument("--port", type=int, default=7497, help="TCP port (default 7497)")
    scenario = sim.add_argument(
        "--scenario", type=Path, help="scenario TOML file (configs/scenarios/)"
    )
    scenario.complete = shtab.FILE  # type: ignore[attr-defined]
    sim.add_argument(
        "--server-version",
        type=server_version,
        help="highest TWS API server version offered, 178-226 (default: the scenario's, 226); "
        "201 and above speak the protobuf wire",
    )
    state = sim.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="keep the account (positions, cash, working orders, fills, order ids) in FILE "
        "across restarts of this process, as IB's servers do; read at start when it exists",
    )
    state.complete = shtab.FILE  # type: ignore[attr-defined]
    sim.add_argument(
        "--show-every",
        type=_seconds,
        metavar="SECONDS",
        help="print the gateway side (positions, working orders per client, FLAT when flat) "
        "every SECONDS; SIGUSR1 prints it once at any time",
    )


def run(args: argparse.Namespace, *, prog: str) -> int:
    """Run the gateway with parsed `args`; returns the exit code. `prog` names the command in
    the one-line errors."""
    from ibsim.scenario import ScenarioError
    from ibsim.server import sim_main
    from ibsim.state import StateFileError

    try:
        return sim_main(
            host=args.host,
            port=args.port,
            scenario_path=args.scenario,
            server_version=args.server_version,
            state_path=args.state,
            show_every_s=args.show_every,
        )
    except ScenarioError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StateFileError as exc:
        # one line: the gateway will not start on an account it cannot read
        print(f"{prog}: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return EX_DATAERR


def main(argv: Sequence[str] | None = None) -> int:
    """`ibsim [options]`: run the simulated IB Gateway."""
    parser = argparse.ArgumentParser(prog="ibsim", description="run the simulated IB Gateway")
    add_arguments(parser)
    return run(parser.parse_args(argv), prog="ibsim")


def server_version(text: str) -> int:
    """argparse type of `--server-version`: an int the simulated gateway can speak."""
    # Here, not at the top: `guardd run` builds this parser too and needs none of the wire.
    from ibsim.messages import MAX_SERVER_VERSION, MIN_SERVER_VERSION

    try:
        version = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not MIN_SERVER_VERSION <= version <= MAX_SERVER_VERSION:
        raise argparse.ArgumentTypeError(
            f"{version} is outside {MIN_SERVER_VERSION}..{MAX_SERVER_VERSION}"
        )
    return version


def _seconds(text: str) -> float:
    """argparse type of `--show-every`: a finite number of seconds above 0."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above 0")
    return seconds
