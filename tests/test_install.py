"""The package as a user installs it: a wheel in a fresh virtual environment, run from a folder
that is not the checkout, finds its shipped search spaces and knows its version."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _setuptools_version() -> tuple[int, ...]:
    import setuptools

    return tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])


def _source_copy(dest: Path) -> Path:
    """The project's tracked files (links kept), so the build starts clean and leaves nothing
    in the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = _source_copy(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("wheels")
    # the installed setuptools builds it when new enough for the SPDX licence field; else pip
    # fetches one into an isolated build environment, as a user's pip would
    isolation = [] if _setuptools_version() < (77, 0) else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                    "-w", str(out), str(source)], check=True, cwd=out)
    (built,) = out.glob("cspine_ray-*.whl")
    return built


def test_the_wheel_carries_the_spaces_the_licence_and_one_version(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
    shipped = {p.name for p in (ROOT / "cspine_ray" / "search_spaces").glob("*.yaml")}
    assert {"demo.yaml", "laptop.yaml", "two_stage.yaml"} <= shipped
    assert {f"cspine_ray/search_spaces/{name}" for name in shipped} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    # the version, read from the package source by hand, is the wheel's and its metadata's
    version = re.search(r'^__version__ = "([^"]+)"', (ROOT / "cspine_ray" / "__init__.py").read_text(),
                        re.M).group(1)
    assert wheel.name.startswith(f"cspine_ray-{version}-")
    assert f"\nVersion: {version}\n" in metadata


def test_an_installed_wheel_runs_from_an_empty_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    # the system's packages (torch, Ray, ...) stay visible; cspine-ray itself comes from the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python, script = venv / "bin" / "python", venv / "bin" / "cspine-ray"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=empty, env=env, capture_output=True, text=True, timeout=300)

    version = run(str(script), "--version")
    assert version.returncode == 0 and re.fullmatch(r"cspine-ray \d+\.\d+\.\d+\S*\n", version.stdout)
    assert run(str(script), "tune", "--help").returncode == 0
    found = run(str(python), "-c", "import cspine_ray; from cspine_ray.tune.cli import find_space; "
                "print(cspine_ray.__file__); print(find_space(None)); "
                "print(find_space('search_spaces/laptop.yaml')); print(find_space('two_stage'))")
    assert found.returncode == 0, found.stderr
    package, demo, laptop, two_stage = (Path(line) for line in found.stdout.split())
    assert venv in package.parents  # the wheel's copy, not the checkout
    for path, name in ((demo, "demo.yaml"), (laptop, "laptop.yaml"), (two_stage, "two_stage.yaml")):
        assert path.name == name and venv in path.parents and path.is_file()
    missing = run(str(script), "tune", "--space", "nosuch")
    assert missing.returncode == 2 and "search space 'nosuch' not found" in missing.stderr
    assert "Traceback" not in missing.stderr
