"""The Python examples of README.md and docs/*.md, run as printed against a real daemon.

Every ```python block is one test case. It runs as a script of its own (`python example.py`,
with the interpreter running the tests: the project's .venv, as the README says) against a
fresh daemon with Python sessions and the MasterService configured (conftest's `Daemon` and
`python_config`), with only the fixed addresses in its text replaced: 127.0.0.1:50051 by the
daemon's tfsd.v1 address, 127.0.0.1:2222 by its MasterService address. A block fails its test
if it raises (a non-zero exit) or runs past BLOCK_TIMEOUT_S.

What the prose tells a reader to do first is done first:
- a block that imports the tfsd.v1 stubs (`from tfsd.v1 import ...`) runs next to the stubs
  that the README's `grpc_tools.protoc` command generates; the command is read from the README
  and run as printed, in a temporary directory laid out like the repository's root (`proto`
  and `.venv` linked in);
- a block whose first statement is not an import continues the python blocks before it in the
  same section (e.g. the README's drop-in "three lines" after the session they reset): it runs
  after them, in the same script.

A block that truly cannot run here starts with a visible comment, `# Not run by the tests:
REASON`; its test is skipped with that reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DEADLINE_S, REPO_ROOT, Daemon, python_config

# Where examples live: the README and every document under docs/.
EXAMPLE_FILES = (REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")))
README = REPO_ROOT / "README.md"

# The fixed addresses the examples use, and the daemon attribute each one stands for.
ADDRESSES = {"127.0.0.1:50051": "address", "127.0.0.1:2222": "master_address"}

# How long one example may run (a Keras example with three fresh Python workers, each
# importing TensorFlow, on a loaded 2-core machine takes about a minute).
BLOCK_TIMEOUT_S = 300.0

UNTESTED_MARK = "# Not run by the tests:"
STUBS_IMPORT = re.compile(r"^\s*from tfsd\.v1 import", re.M)
# The README's command that generates the tfsd.v1 stubs, in backquotes.
PROTOC_COMMAND = re.compile(r"`([^`\n]*-m grpc_tools\.protoc [^`\n]*)`")
HEADING = re.compile(r"^(#{1,6}) +(.*?)\s*$")
FENCE = re.compile(r"^(```+|~~~+)\s*(\S*)")


@dataclass(frozen=True)
class Example:
    path: Path
    line: int
    """1-based line of the block's opening fence."""
    section: str
    code: str
    program: str
    """What runs: the block, after the blocks it continues."""

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")[:40]
        return f"{self.path.name}:{self.line}-{slug}"

    @property
    def untested_reason(self) -> str | None:
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        if first.startswith(UNTESTED_MARK):
            return first[len(UNTESTED_MARK) :].strip() or "marked as not run"
        return None


def first_statement(code: str) -> str:
    for line in code.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return stripped
    return ""


def is_continuation(code: str) -> bool:
    first = first_statement(code)
    return not (first.startswith("import ") or first.startswith("from "))


def python_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line of the opening fence, section heading, code) of each ```python block."""
    blocks = []
    section = ""
    fence = None  # the opening fence's marker while inside a block
    language = ""
    start = 0
    lines: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        opened = FENCE.match(line)
        if fence is None:
            if opened:
                fence, language, start, lines = opened.group(1), opened.group(2), number, []
            elif heading := HEADING.match(line):
                section = heading.group(2)
        elif line.strip() == fence:
            if language == "python":
                blocks.append((start, section, "\n".join(lines) + "\n"))
            fence = None
        else:
            lines.append(line)
    assert fence is None, f"{path.name}:{start}: a code block is never closed"
    return blocks


def collect() -> list[Example]:
    examples = []
    for path in EXAMPLE_FILES:
        previous: Example | None = None
        for line, section, code in python_blocks(path):
            program = code
            if is_continuation(code):
                if previous is None or previous.section != section:
                    raise AssertionError(
                        f"{path.name}:{line}: this python block does not start with an import, "
                        f"so it continues the block before it in its section ({section!r}), "
                        "but there is none: make it whole"
                    )
                program = previous.program + "\n" + code
            previous = Example(path, line, section, code, program)
            examples.append(previous)
    return examples


EXAMPLES = collect()


def test_the_examples_are_found():
    """The collection itself: the README's and MASTER_SERVICE.md's examples are there, and
    every block that continues another does so within its section."""
    files = {example.path.name for example in EXAMPLES}
    assert {"README.md", "MASTER_SERVICE.md"} <= files
    assert sum(example.path == README for example in EXAMPLES) >= 5
    assert PROTOC_COMMAND.search(README.read_text()), "the README no longer says how to make stubs"


def generate_stubs(directory: Path) -> None:
    """Runs the README's stub command, as printed, where the repository's `proto` and `.venv`
    are where the command expects them (it is run from the repository's root)."""
    command = PROTOC_COMMAND.search(README.read_text()).group(1)
    for name in ("proto", ".venv"):
        (directory / name).symlink_to(REPO_ROOT / name, target_is_directory=True)
    result = subprocess.run(
        command,
        shell=True,
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert result.returncode == 0, f"`{command}` failed ({result.returncode}):\n{result.stderr}"


def with_addresses(code: str, daemon: Daemon) -> str:
    for fixed, attribute in ADDRESSES.items():
        code = code.replace(fixed, getattr(daemon, attribute))
    return code


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.id for example in EXAMPLES])
def test_example_runs_as_printed(example: Example, tmp_path: Path):
    reason = example.untested_reason
    if reason is not None:
        pytest.skip(f"{example.id}: {reason}")
    workdir = tmp_path / "example"
    workdir.mkdir()
    if STUBS_IMPORT.search(example.program):
        generate_stubs(workdir)
    daemon = Daemon("--config", str(python_config(tmp_path / "tfsd.toml")))
    try:
        assert daemon.master_address, "the daemon did not announce its MasterService"
        script = workdir / "example.py"
        script.write_text(with_addresses(example.program, daemon))
        try:
            result = subprocess.run(
                [sys.executable, script.name],
                cwd=workdir,
                env=dict(os.environ),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as expired:
            pytest.fail(
                f"{example.id} ran past {BLOCK_TIMEOUT_S:.0f} s:\n{tail(expired.stdout)}"
                f"\n{tail(expired.stderr)}"
            )
    finally:
        code = daemon.stop()
    print(result.stdout, end="")
    assert result.returncode == 0, (
        f"{example.id} failed with exit status {result.returncode}:\n"
        f"--- program ---\n{example.program}--- stderr ---\n{tail(result.stderr)}"
    )
    assert code == 0, f"tfsd exited with {code} after SIGTERM"


def tail(output: str | bytes | None, lines: int = 60) -> str:
    if output is None:
        return ""
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    return "\n".join(output.splitlines()[-lines:])
