"""The wheel: what it carries (the example config, the scenarios, the units, the dashboard, the
alert rules, the LICENSE), its SPDX license metadata and dependency floors, and `guardd init DIR`
run from the built wheel (a starter deployment; never an overwrite).

The wheel is built by `uv build` (scripts/bootstrap installs uv into .tools/bin).
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from guardd import __version__
from guardd.cli import main
from guardd.shipped import EX_CANTCREAT, STARTER_FILES, shipped, write_starter

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
DIST_INFO = f"guardd-{__version__}.dist-info"
# A shipped name under guardd/_data/ -> the file in this checkout it is a copy of.
SHIPPED = {
    "demo.toml": ROOT / "configs" / "demo.toml",
    "guardd.example.toml": ROOT / "configs" / "guardd.example.toml",
    **{f"scenarios/{p.name}": p for p in (ROOT / "configs" / "scenarios").glob("*.toml")},
    **{f"systemd/{p.name}": p for p in (ROOT / "deploy" / "systemd").iterdir()},
    "prometheus/alerts.yml": ROOT / "deploy" / "prometheus" / "alerts.yml",
    "prometheus/alerts_test.yml": ROOT / "deploy" / "prometheus" / "alerts_test.yml",
    "grafana/guardd.json": ROOT / "deploy" / "grafana" / "guardd.json",
}
# aiohttp releases with published advisories end below this floor: 3.13.4 (CVE-2026-22815,
# CVE-2026-34513..34520, CVE-2026-34525), 3.14.0 (CVE-2026-34993, CVE-2026-47265), 3.14.1
# (CVE-2026-54273..54280), 3.14.2 (GHSA-mfx4-hv73-q22v, GHSA-mq44-7p77-q5h7), 3.14.3
# (GHSA-cq5v-8q36-5273).
AIOHTTP_FLOOR = "aiohttp>=3.14.3"


def uv() -> str:
    for candidate in (ROOT / ".tools" / "bin" / "uv", shutil.which("uv")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("uv not found in .tools/bin or on PATH: run scripts/bootstrap")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [uv(), "build", "--wheel", "--out-dir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("guardd-*.whl")
    return path


def test_wheel_built_then_it_carries_every_shipped_file_as_in_the_checkout(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name, original in SHIPPED.items():
            assert f"guardd/_data/{name}" in names, name
            assert archive.read(f"guardd/_data/{name}") == original.read_bytes(), name
    # every file `guardd init` writes is among them
    assert {source for _, source in STARTER_FILES} <= set(SHIPPED)


def test_wheel_built_then_spdx_license_and_the_license_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        metadata = email.parser.Parser().parsestr(archive.read(f"{DIST_INFO}/METADATA").decode())
        license_text = archive.read(f"{DIST_INFO}/licenses/LICENSE").decode()

    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["License"] is None  # the old free-text field is gone (PEP 639)
    assert license_text.startswith("MIT License")
    assert license_text == (ROOT / "LICENSE").read_text()


def test_wheel_built_then_aiohttp_floor_excludes_releases_with_advisories(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        metadata = email.parser.Parser().parsestr(archive.read(f"{DIST_INFO}/METADATA").decode())

    aiohttp = [req for req in metadata.get_all("Requires-Dist") or [] if req.startswith("aiohttp")]
    assert aiohttp == [AIOHTTP_FLOOR]


def test_wheel_installed_then_guardd_init_writes_a_deployment_and_never_overwrites(
    wheel: Path, tmp_path: Path
) -> None:
    # Arrange: the wheel's guardd first on the path, ahead of this checkout's editable install.
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    deployment = tmp_path / "etc-guardd"

    def guardd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "guardd", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,  # not the checkout: only the wheel's _data can answer
            timeout=60,
            check=False,
        )

    where = subprocess.run(
        [sys.executable, "-c", "import guardd.shipped as s; print(s.shipped('systemd'))"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=True,
    )
    assert where.stdout.strip() == str(unpacked / "guardd" / "_data" / "systemd")

    # Act
    first = guardd("init", str(deployment))
    second = guardd("init", str(deployment))

    # Assert: everything written, equal to the checkout's originals; the second run refused.
    assert first.returncode == 0, first.stderr
    for relative, source in STARTER_FILES:
        assert (deployment / relative).read_bytes() == SHIPPED[source].read_bytes(), relative
        assert f"wrote {deployment / relative}" in first.stdout
    assert second.returncode == EX_CANTCREAT
    assert "would overwrite" in second.stderr
    assert str(deployment / "guardd.toml") in second.stderr
    checked = guardd("check-config", str(deployment / "guardd.toml"))
    # the starter config parses; only the unit's credential files are missing outside the unit
    assert "cannot read /run/credentials/guardd.service/" in checked.stderr


def test_one_file_already_there_then_init_refuses_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "prometheus").mkdir()
    (tmp_path / "prometheus" / "alerts.yml").write_text("mine\n")

    code = main(["init", str(tmp_path)])

    assert code == EX_CANTCREAT
    assert f"would overwrite {tmp_path / 'prometheus' / 'alerts.yml'}" in capsys.readouterr().err
    assert (tmp_path / "prometheus" / "alerts.yml").read_text() == "mine\n"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "prometheus",
        "prometheus/alerts.yml",
    ]


def test_empty_directory_then_write_starter_writes_every_file(tmp_path: Path) -> None:
    written = write_starter(tmp_path / "new")

    assert [p.relative_to(tmp_path / "new").as_posix() for p in written] == [
        relative for relative, _ in STARTER_FILES
    ]
    assert all(
        p.read_bytes() == shipped(s).read_bytes()
        for p, (_, s) in zip(written, STARTER_FILES, strict=True)
    )
