"""docs/writing-a-monitor.md as a user meets it: its example package, built from the page's own
code blocks, installs into a fresh virtual environment, passes its tests there, and its flag
comes out of `canvaswatch check`; and the page states the same rules as the base module."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

import canvaswatch.monitors.base as base

DOC = Path(__file__).resolve().parents[2] / "docs" / "writing-a-monitor.md"
FILE_BLOCK = re.compile(r'^```\w+ title="(?P<path>[^"]+)"\n(?P<text>.*?)^```$', re.MULTILINE | re.DOTALL)


def doc_files() -> dict[str, str]:
    """Every code block of the page that names a file, by that file's path."""
    return {match["path"]: match["text"] for match in FILE_BLOCK.finditer(DOC.read_text())}


def numbered_rules(text: str) -> list[str]:
    """The numbered list after 'The rules', each item on one line."""
    section = text[text.index("The rules"):]
    items = re.findall(r"^ *(\d+)\. (.*?)(?=^ *\d+\. |^\S|\Z)", section, re.MULTILINE | re.DOTALL)
    return [f"{number}. {' '.join(body.split())}" for number, body in items]


def test_the_page_states_the_rules_of_the_base_module_word_for_word():
    rules = numbered_rules(base.__doc__)
    assert len(rules) == 9
    page = DOC.read_text()
    assert numbered_rules(page[page.index("## The rules"):page.index("## A complete package")]) == rules


def test_the_page_holds_a_whole_package():
    assert set(doc_files()) == {
        "canvaswatch-revisions/pyproject.toml",
        "canvaswatch-revisions/canvaswatch_revisions/__init__.py",
        "canvaswatch-revisions/tests/test_revisions.py",
        "revisions.toml",
    }


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_the_example_package_installs_passes_its_tests_and_flags_through_canvaswatch_check(tmp_path):
    for path, text in doc_files().items():
        target = tmp_path / "src" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    # A fresh environment that sees this one's packages (canvaswatch, pytest, setuptools) behind its own,
    # as `python -m venv --system-site-packages` would see a system installation.
    environment = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(environment)
    python = environment / "bin" / "python"
    own = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip())
    (own / "outer.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")

    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
          str(tmp_path / "src" / "canvaswatch-revisions")], tmp_path)
    where = _run([str(python), "-c", "import canvaswatch_revisions; print(canvaswatch_revisions.__file__)"], tmp_path)
    assert where.stdout.strip().startswith(str(own))  # the installed copy, not the source tree

    tests = _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  str(tmp_path / "src" / "canvaswatch-revisions" / "tests")], tmp_path)
    assert "4 passed" in tests.stdout

    cli = [str(python), "-m", "canvaswatch.server.cli"]
    _run(cli + ["simulate", "corpus.cwtrace", "--corpus", "--per-scenario", "1"], tmp_path)
    checked = _run(cli + ["check", "corpus.cwtrace", "--config", str(tmp_path / "src" / "revisions.toml")], tmp_path)
    assert re.search(r"^  revisions INFO: block \d+: \d+ confident token\(s\) replaced", checked.stdout, re.MULTILINE), \
        checked.stdout
    assert "monitor error" not in checked.stdout
