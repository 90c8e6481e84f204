"""The README's commands, run as written on the toy model from a folder outside the clone, print the
numbers the README quotes."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def bash_blocks(section: str) -> list[str]:
    """The ```bash blocks of a README section (## heading up to the next ## heading)."""
    start = README.index(f"## {section}\n")
    end = README.find("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)```", README[start:end if end > 0 else None], re.S)


def run_block(block: str, cwd: Path) -> str:
    """Run a README block in bash with `localization-heads` meaning this checkout's CLI."""
    command = f"localization-heads() {{ {sys.executable} -m localization_heads \"$@\"; }}\nset -e\n{block}"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture()
def elsewhere(tmp_path: Path) -> Path:
    """A folder outside the clone holding only the README's example inputs."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    return tmp_path


def quoted(pattern: str) -> str:
    match = re.search(pattern, README, re.S)
    assert match, f"the README no longer quotes {pattern!r}"
    return match.group(1)


def test_quick_start_prints_the_box_and_heads_the_readme_quotes(elsewhere):
    quick, _protocol = bash_blocks("Quick start (bundled toy model, CPU, seconds)")
    log = run_block(quick, elsewhere)
    assert quoted(r"`(attention \[L, H, 1, V\] = \[[^`]*\])`") in log
    assert quoted(r"`(bbox \[[^\]]*\])") in log
    assert quoted(r"(heads \[\(2[^\]]*\])`") in log
    folder = elsewhere / "_overhaul/outputs/localization_heads/toy-llava"
    for suffix in (".pkl", "_analysis.pkl", "_top3.png", "_mask.png", "_bbox.json"):
        assert (folder / f"sample{suffix}").is_file(), suffix


def test_the_protocol_walkthrough_selects_the_quoted_heads_and_scores_the_quoted_accuracy(elsewhere):
    _quick, protocol = bash_blocks("Quick start (bundled toy model, CPU, seconds)")
    log = run_block(protocol, elsewhere)
    assert quoted(r"logs `(selected heads \[\[[^`]*)`") in log
    table = quoted(r"prints:\n\n```\n(.*?)```")
    numbers = table.split("\n")[1].split()
    assert re.search(r"localization_data\s+" + r"\s+".join(map(re.escape, numbers[1:])), log), log[-2000:]
    assert (elsewhere / "runs/toy/toy-llava/report/index.html").is_file()
