"""The README's commands run as written.

Every fenced shell block of README.md and lab/README.md (```bash, ```sh, ```shell, ```console) and the
commands in the comments of ``examples/*.yaml`` (lines ``#   flexkd ...``) run from the root of a scratch
copy of the repository, in a fresh cache, one block per test, each line as written except:

- at the reduced size the README states for it (``REDUCED``: ``--quick`` for ``flexkd demo`` and
  ``flexkd teacher``, a few ``--set`` overrides for the config commands, one task and seed of the quick
  study for ``flexkd study``), appended to the line;
- ``pip install ...`` parts are not run: this environment is the README's dev install, made by CI's
  own install step (``.ci/run``) with the same commands;
- ``python -m pytest ...`` parts are not run: that is the suite this test belongs to, CI's test step.

A block the README marks with ``<!-- readme-test: skip REASON -->`` on the line before it is reported as
skipped with that reason. New blocks are picked up automatically: give a slow one a reduced form here
(and in the README's words) or mark it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHELL_FENCES = ("bash", "sh", "shell", "console")
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip\s+(.*?)\s*-->")
# What the README says makes each command small (its own words: "--quick", "In seconds: --set ...").
CONFIG_REDUCED = (
    "--set selection.max_rows=16 --set train.max_steps=2 --set data.max_length=16 "
    "--set train.progress=false"
)
REDUCED = {
    "demo": "--quick --no-progress",
    "teacher": "--quick --no-progress",
    "score": CONFIG_REDUCED,
    "distill": CONFIG_REDUCED,
    "eval": CONFIG_REDUCED,
}
# flexkd-lab's: lab/README.md states it
STUDY_REDUCED = "--quick --seeds 0 1 --methods none flex-corr --no-teacher-check"
REDUCED["study"] = f"{STUDY_REDUCED} --no-progress"
READMES = ("README.md", "lab/README.md")
NOT_RUN = {
    "pip install": "the environment is this dev install (CI's install step runs the README's pip commands)",
    "python -m pytest": "the test suite itself (CI's test step runs it)",
}
BLOCK_TIMEOUT_S = 900
COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    "runs",
    "build",
    "dist",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".hypothesis",
    "flexkd-study",
    "flexkd-bench",
    ".venv*",
    "*.so",
)


@dataclass
class Block:
    source: str  # "README.md:12", "lab/README.md:9" or "examples/x.yaml"
    lines: list[str]
    skip: str | None = None

    @property
    def id(self) -> str:
        return self.source


def readme_blocks(text: str, name: str = "README.md") -> list[Block]:
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w+)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start = i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) in SHELL_FENCES:
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            mark = SKIP_MARK.search(before)
            body = [
                line
                for line in lines[start + 1 : end]
                if line.strip() and not line.lstrip().startswith("#")
            ]
            blocks.append(Block(f"{name}:{start + 1}", body, mark.group(1) if mark else None))
        i = end + 1
    return blocks


def example_blocks() -> list[Block]:
    blocks = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        commands = [
            m.group(1)
            for line in path.read_text().splitlines()
            if (m := re.match(r"^#\s+((?:flexkd|torchrun|python) .*)$", line))
        ]
        if commands:
            blocks.append(Block(f"examples/{path.name}", commands))
    return blocks


def subcommand(words: list[str]) -> str | None:
    """The flexkd subcommand a command line runs (``flexkd X``, ``python -m flexkd X``, ``torchrun ... -m flexkd X``)."""
    for i, word in enumerate(words):
        if word == "flexkd" and (i == 0 or words[i - 1] == "-m"):
            rest = [w for w in words[i + 1 :] if not w.startswith("-")]
            return rest[0] if rest else None
    return None


def as_run(line: str) -> tuple[str | None, list[str]]:
    """The shell line to run for one README line (None: nothing left) and what was left out, and why."""
    kept, left_out = [], []
    for part in re.split(r"\s*&&\s*", line):
        words = shlex.split(part, comments=True)
        if not words:
            continue
        text = shlex.join(words)
        reason = next((why for start, why in NOT_RUN.items() if text.startswith(start)), None)
        if reason is not None:
            left_out.append(f"{text}: {reason}")
            continue
        reduced = REDUCED.get(subcommand(words) or "")
        kept.append(text + (f" {reduced}" if reduced else ""))
    return (" && ".join(kept) or None), left_out


def without_repeats(readme: list[Block], examples: list[Block]) -> list[Block]:
    """Examples whose every command a README block runs are marked as covered there, not run twice."""
    runs = {
        shlex.join(shlex.split(line, comments=True)): b.source for b in readme for line in b.lines
    }
    for block in examples:
        where = {runs.get(shlex.join(shlex.split(line, comments=True))) for line in block.lines}
        if None not in where:
            block.skip = f"each of its commands runs in {', '.join(sorted(where))}"
    return readme + examples


ALL_BLOCKS = without_repeats(
    [block for name in READMES for block in readme_blocks((ROOT / name).read_text(), name)],
    example_blocks(),
)


def test_the_readme_states_every_reduced_form():
    """The reduced sizes used here are the README's own, not the test's secret."""
    readme = (ROOT / "README.md").read_text()
    for option in {*CONFIG_REDUCED.split(" --set "), "--quick"}:
        option = option.removeprefix("--set ")
        if option != "train.progress=false":
            assert option in readme, f"README.md does not say {option!r}"
    assert STUDY_REDUCED in (ROOT / "lab" / "README.md").read_text()


def test_harness_reads_blocks_marks_and_segments():
    text = "x\n```bash\nflexkd info\n```\n<!-- readme-test: skip needs a GPU -->\n```sh\nnvidia-smi\n```\n```python\nx=1\n```\n"
    blocks = readme_blocks(text)
    assert readme_blocks(text, "lab/README.md")[0].source == "lab/README.md:2"
    assert [(b.lines, b.skip) for b in blocks] == [
        (["flexkd info"], None),
        (["nvidia-smi"], "needs a GPU"),
    ]
    line, left_out = as_run("pip install -e . && flexkd demo   # the demo")
    assert line == "flexkd demo --quick --no-progress" and left_out[0].startswith(
        "pip install -e ."
    )
    assert as_run("pip install x && python -m pytest -q")[0] is None
    assert (
        subcommand(shlex.split("torchrun --nproc_per_node 2 -m flexkd distill c.yaml")) == "distill"
    )


@pytest.mark.slow
@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.id)
def test_readme_block_runs_as_written(block: Block, tmp_path: Path):
    if block.skip:
        pytest.skip(f"{block.source} is marked not-run: {block.skip}")
    script, left_out = [], []
    for line in block.lines:
        command, skipped = as_run(line)
        left_out += skipped
        if command:
            script.append(command)
    if not script:
        pytest.skip(f"{block.source}: nothing of it runs here: " + "; ".join(left_out))
    work = tmp_path / "checkout"
    shutil.copytree(ROOT, work, ignore=COPY_IGNORE)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLEXKD_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    for command in script:
        done = subprocess.run(
            ["bash", "-c", f"set -euo pipefail; {command}"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
        assert done.returncode == 0, (
            f"{block.source}: `{command}` exited {done.returncode}\n"
            f"--- stdout (tail)\n{done.stdout[-3000:]}\n--- stderr (tail)\n{done.stderr[-3000:]}"
        )
    if left_out:
        print(f"{block.source}: not run: " + "; ".join(left_out))
