"""The files guardd ships beside its code, and `guardd init DIR`, which writes out a deployment's.

An installed wheel carries them in ``guardd/_data/`` (pyproject's ``force-include``); a checkout
has them at their places in the tree (``configs/``, ``deploy/``). `shipped()` finds either.

`guardd init DIR` writes a starter config and the files a deployment needs: the systemd units, the
Prometheus alert rules with their promtool tests, the Grafana dashboard, and the simulator's
scenarios for rehearsing. It never overwrites: when any of those files already exists it writes
nothing, names them and exits 73 (EX_CANTCREAT).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

__all__ = ["EX_CANTCREAT", "STARTER_FILES", "init_main", "shipped", "write_starter"]

EX_CANTCREAT = 73

_HERE = Path(__file__).resolve().parent
_CHECKOUT = _HERE.parent
# A name under _data/ -> where a checkout keeps it.
_IN_CHECKOUT = {
    "demo.toml": "configs/demo.toml",
    "guardd.example.toml": "configs/guardd.example.toml",
    "scenarios": "configs/scenarios",
    "systemd": "deploy/systemd",
    "prometheus": "deploy/prometheus",
    "grafana": "deploy/grafana",
}

# What `guardd init DIR` writes: the path under DIR <- the shipped file.
STARTER_FILES: tuple[tuple[str, str], ...] = (
    ("guardd.toml", "guardd.example.toml"),
    ("systemd/guardd.service", "systemd/guardd.service"),
    ("systemd/guardd@.service", "systemd/guardd@.service"),
    ("systemd/guardd-failure@.service", "systemd/guardd-failure@.service"),
    ("prometheus/alerts.yml", "prometheus/alerts.yml"),
    ("prometheus/alerts_test.yml", "prometheus/alerts_test.yml"),
    ("grafana/guardd.json", "grafana/guardd.json"),
    ("scenarios/calm.toml", "scenarios/calm.toml"),
    ("scenarios/incident.toml", "scenarios/incident.toml"),
)


def shipped(name: str) -> Path:
    """The shipped file `name` (a path under ``_data/``): the wheel's copy, else the checkout's.

    Raises FileNotFoundError naming both places when neither has it.
    """
    packaged = _HERE / "_data" / name
    if packaged.exists():
        return packaged
    top, _, rest = name.partition("/")
    if top in _IN_CHECKOUT:
        in_checkout = (
            _CHECKOUT / _IN_CHECKOUT[top] / rest if rest else _CHECKOUT / _IN_CHECKOUT[top]
        )
        if in_checkout.exists():
            return in_checkout
    raise FileNotFoundError(f"{name} is neither in {packaged.parent} nor in a checkout")


def write_starter(directory: Path) -> list[Path]:
    """Write `STARTER_FILES` under `directory` and return them; refuse to overwrite any.

    Raises FileExistsError naming every file already there (and writes nothing then).
    """
    targets = [(directory / relative, shipped(source)) for relative, source in STARTER_FILES]
    present = [target for target, _ in targets if target.exists() or target.is_symlink()]
    if present:
        raise FileExistsError(", ".join(str(path) for path in present))
    written: list[Path] = []
    for target, source in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        # "x": a file that appeared since the check above is not overwritten either.
        with target.open("xb") as out:
            out.write(source.read_bytes())
        written.append(target)
    return written


def init_main(directory: Path, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`guardd init DIR`: write the starter files, print them and the next steps; an exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        written = write_starter(directory)
    except FileExistsError as exc:
        print(f"guardd init: would overwrite {exc}; nothing written", file=err)
        return EX_CANTCREAT
    except OSError as exc:
        print(f"guardd init: {exc}", file=err)
        return EX_CANTCREAT
    for path in written:
        print(f"wrote {path}", file=out)
    config = directory / "guardd.toml"
    print(
        f"next: edit {config} (account, ib.*, state_dir), then `guardd check-config {config}`;\n"
        f"      install the units from {directory / 'systemd'} and the alert rules and dashboard\n"
        "      as docs/deployment.md says",
        file=out,
    )
    return 0
