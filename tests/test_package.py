"""The package as a user installs it: `pip install .` into a fresh venv (a copy of the clone, so the
checkout is never touched), then, from a folder that is not the repository, the console command on
the bundled toy model, the Python API with the same inputs, and the installed distribution's
top-level names; `pip install -e .` works too. Offline: the venv sees this interpreter's packages
(--system-site-packages) and this interpreter's pip builds with them (--no-deps --no-build-isolation
--no-index). The venv gets no pip of its own (--without-pip): ensurepip would also give it the old
setuptools bundled with Python, which shadows ours and cannot read the SPDX licence field."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "images" / "toy_tall.png"
QUERY = "the small yellow circle ."
TOY = ["logic=paper", "logic.heads=models/toy-llava/selected_heads.json", "logic.mask.threshold=half_max"]
COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".pytest_cache", "_overhaul", "outputs",
                                     "multirun", "build", "*.egg-info", ".benchmarks")


def clean_env() -> dict:
    """The environment without anything that would put the checkout on sys.path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def run(args, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def make_venv(root: Path, *pip_args) -> Path:
    """A venv under root with the clone's copy installed by `pip install <pip_args>`; its bin folder."""
    setuptools = pytest.importorskip("setuptools", reason="building the package needs setuptools (requirements.txt)")
    assert int(setuptools.__version__.split(".")[0]) >= 77, f"setuptools {setuptools.__version__}: pyproject.toml needs >= 77"
    src = root / "src"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)
    venv = root / "venv"
    created = run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=root)
    assert created.returncode == 0, created.stderr
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    installed = run([sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "-q",
                     "--disable-pip-version-check", "--no-deps", "--no-build-isolation", "--no-index", *pip_args], cwd=src)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return bin_dir


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(venv bin folder, a working folder outside the repository)."""
    root = tmp_path_factory.mktemp("installed")
    work = root / "work"
    work.mkdir()
    return make_venv(root, "."), work


@pytest.fixture(scope="module")
def cli_box(installed) -> list[float]:
    bin_dir, work = installed
    out = work / "out"
    proc = run([bin_dir / "localization-heads", "stage=pipeline", "model=toy", f"data.image_file={IMAGE}",
                f"data.query={QUERY}", *TOY, f"data.output_dir={out}"], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "toy-llava" / "sample_bbox.json").read_text())
    return summary["bbox_xyxy"]


def test_console_command_runs_the_toy_from_any_folder(cli_box):
    """The bundled toy model and heads file are found from a folder that is not the clone, and the
    box lies on the 96×146 image."""
    x0, y0, x1, y1 = cli_box
    assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 146


def test_installed_api_gives_the_console_commands_box(installed, cli_box):
    bin_dir, work = installed
    code = ("import json, localization_heads\n"
            "from localization_heads import Grounder\n"
            f"g = Grounder.from_pretrained('toy', overrides={TOY!r})\n"
            f"r = g.ground({str(IMAGE)!r}, {QUERY!r})\n"
            "print(json.dumps({'box': r.box, 'file': localization_heads.__file__}))\n")
    proc = run([bin_dir / "python", "-c", code], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["box"] == cli_box
    assert Path(got["file"]).resolve().is_relative_to(bin_dir.parent.resolve())   # the installed copy, not the clone


def test_the_distribution_installs_one_top_level_package(installed):
    """Nothing but localization_heads at top level (no `evaluate`, `settings`, `tests`, `lab`, ...):
    by the RECORD of installed files and by top_level.txt."""
    bin_dir, work = installed
    code = ("import json, importlib.metadata as md\n"
            "d = md.distribution('localization-heads')\n"
            "tops = sorted({f.parts[0] for f in d.files if not f.parts[0].endswith(('.dist-info', '.egg-info'))"
            " and f.parts[0] != '..' and not f.name.endswith('.pth')})\n"
            "top_level = (d.read_text('top_level.txt') or '').split()\n"
            "eps = [e.value for e in d.entry_points if e.group == 'console_scripts']\n"
            "print(json.dumps({'tops': tops, 'top_level': top_level, 'scripts': eps, 'version': d.version}))\n")
    proc = run([bin_dir / "python", "-c", code], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = json.loads(proc.stdout.strip().splitlines()[-1])
    assert dist["tops"] == ["localization_heads"]
    assert dist["top_level"] in ([], ["localization_heads"])
    assert dist["scripts"] == ["localization_heads.cli:main"]
    import localization_heads
    assert dist["version"] == localization_heads.__version__


def test_editable_install_imports_the_clone(tmp_path):
    bin_dir = make_venv(tmp_path, "-e", ".")
    work = tmp_path / "work"
    work.mkdir()
    proc = run([bin_dir / "python", "-c", "import localization_heads.cli as c, localization_heads as p; "
                "print(p.__file__); print(c.compose('model=toy').model.name)"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    file, model = proc.stdout.strip().splitlines()[-2:]
    assert Path(file).resolve().is_relative_to((tmp_path / "src").resolve()) and model == "models/toy-llava"
    assert (bin_dir / "localization-heads").is_file()
