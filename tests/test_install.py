"""A non-editable install (a wheel, as `pip install "git+…"` and Colab make) holds all of minisd and
finds every shipped file in assets/ without the repository beside it."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSET_FILES = sorted(p.relative_to(ROOT / "assets").as_posix() for p in (ROOT / "assets").rglob("*") if p.is_file())
MODULES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "minisd").rglob("*.py"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    (path,) = out.glob("minisd-*.whl")
    return path


def test_the_wheel_holds_every_module_and_every_asset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [m for m in MODULES if m not in names] == []  # e.g. a new subpackage missing from pyproject's list
    assert [a for a in ASSET_FILES if f"minisd/assets/{a}" not in names] == []


def test_an_installed_minisd_resolves_every_asset_without_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    script = (
        "import hashlib, minisd, sys\n"
        "from minisd.config import ASSETS, asset_path\n"
        f"assert minisd.__file__.startswith({str(target)!r}), minisd.__file__\n"
        "for name in sys.argv[1:]:\n"
        "    path = asset_path(*name.split('/'))\n"
        "    assert path.is_relative_to(ASSETS) and path.is_file(), path\n"
        "    print(name, hashlib.sha256(path.read_bytes()).hexdigest())\n"
    )
    # run from an empty folder with the installed copy first on the path (it wins over the editable install)
    result = subprocess.run([sys.executable, "-c", script, *ASSET_FILES], cwd=tmp_path, capture_output=True, text=True,
                            env=os.environ | {"PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr
    import hashlib

    lines = dict(line.split() for line in result.stdout.splitlines())
    assert lines == {a: hashlib.sha256((ROOT / "assets" / a).read_bytes()).hexdigest() for a in ASSET_FILES}
