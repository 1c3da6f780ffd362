"""Shell completion for `guardd` and `guardctl`: `guardd completion bash|zsh|tcsh` prints a script
that shtab makes from the command's own argparse parser, so it always names the subcommands and
options the installed version has (docs/control.md says where to put it)."""

from __future__ import annotations

import argparse

import shtab

__all__ = ["SHELLS", "add_completion_command", "complete_directories", "complete_files", "script"]

SHELLS = ("bash", "zsh", "tcsh")


def add_completion_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``completion SHELL`` subcommand to a command's subparsers."""
    completion = commands.add_parser(
        "completion", help="print a shell completion script (bash, zsh, tcsh)"
    )
    completion.add_argument("shell", choices=SHELLS)


def complete_files(action: argparse.Action) -> None:
    """Complete the argument of `action` with file names."""
    action.complete = shtab.FILE  # type: ignore[attr-defined]


def complete_directories(action: argparse.Action) -> None:
    """Complete the argument of `action` with directory names."""
    action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script of `parser`'s command for `shell`."""
    return shtab.complete(parser, shell=shell)
