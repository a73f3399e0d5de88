"""Every command-line entry point answers --help: argparse formats each help string with %, so a stray % in one
(``5% of chance``) crashes --help alone, which no other test runs."""

import os
import subprocess
import sys

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


def _run_helps(commands: dict[str, list[str]], at_once: int) -> dict[str, subprocess.CompletedProcess]:
    """Every command's --help, ``at_once`` at a time (each spends seconds importing torch and Ray), all started
    from this thread: an exec from a worker thread failed once with EFAULT in this sandbox."""
    done, names = {}, list(commands)
    for i in range(0, len(names), at_once):
        batch = {n: subprocess.Popen([sys.executable, *commands[n], "--help"], cwd=REPO, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in names[i:i + at_once]}
        try:
            for n, proc in batch.items():
                out, err = proc.communicate(timeout=180)
                done[n] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        finally:  # a timeout leaves no --help running, as subprocess.run's did
            for proc in batch.values():
                proc.kill()  # a no-op on the ones already waited for
    return done


@pytest.fixture(scope="module")
def helps():
    return _run_helps(COMMANDS, os.cpu_count() or 1)


def test_the_entry_points_are_found():
    assert {"collectors.launch", "meta.status", "known.predict", "known.train", "evaluation.transfer"} <= set(MODULES)
    assert all((REPO / s).is_file() for s in SCRIPTS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_prints_usage(helps, name):
    run = helps[name]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "usage" in run.stdout
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
