"""Every command-line entry point answers --help: argparse formats each help string with %, so a stray % in one
(``5% of chance``) crashes --help alone, which no other test runs."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO

PACKAGES = ("collectors", "meta", "known", "evaluation")
SCRIPTS = ("collectors/launch.py",)  # also run as a file (README, Makefile)


def entry_points() -> list[str]:
    """The modules of PACKAGES with an argparse ``main`` (most through ``meta.cli.Parser``): what ``python -m`` runs."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            text = path.read_text()
            if "def main(" in text and ("argparse" in text or "cli.Parser(" in text):
                found.append(f"{package}.{path.stem}")
    return found


MODULES = entry_points()
COMMANDS = {**{m: ["-m", m] for m in MODULES}, **{s: [s] for s in SCRIPTS}}


def _help(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def helps():
    """Every command's --help, run a core's worth at a time (each spends seconds importing torch and Ray)."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        yield {name: pool.submit(_help, command) for name, command in COMMANDS.items()}


def test_the_entry_points_are_found():
    assert {"collectors.launch", "meta.status", "known.predict", "known.train", "evaluation.transfer"} <= set(MODULES)
    assert all((REPO / s).is_file() for s in SCRIPTS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_prints_usage(helps, name):
    run = helps[name].result()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "usage" in run.stdout
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
