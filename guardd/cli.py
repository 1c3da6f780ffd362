"""The `guardd` command line: `sim` (the simulated gateway), and the guard's own commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EX_CONFIG = 78  # sysexits.h: configuration error; systemd does not restart on it


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("sim", help="run the simulated IB Gateway")
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    sim.add_argument("--port", type=int, default=7497, help="TCP port (default 7497)")
    sim.add_argument("--scenario", type=Path, help="scenario TOML file (configs/scenarios/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a `guardd` subcommand and return its exit code."""
    args = _parser().parse_args(argv)
    if args.command == "sim":
        from guardd.sim.scenario import ScenarioError
        from guardd.sim.server import sim_main

        try:
            return sim_main(host=args.host, port=args.port, scenario_path=args.scenario)
        except ScenarioError as exc:
            print(f"guardd sim: {exc}", file=sys.stderr)
            return EX_CONFIG
    raise AssertionError(f"unhandled command {args.command}")
