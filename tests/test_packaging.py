"""What a user gets from ``pip install``: every third-party import declared, the ``oblivion`` command, the configs."""

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions

import pytest

from conftest import REPO
from oblivion import cli
from test_cli_help import entry_points

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PACKAGES = ("collectors", "meta", "known", "evaluation", "oblivion")
OPTIONAL = {"triton"}  # comes with torch's CUDA build; imported only where a CUDA tensor is predicted (known/gpu.py)


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")


def test_every_third_party_import_is_declared():
    imported = set()
    for package in PACKAGES:
        for path in (REPO / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    imported.add(node.module.split(".")[0])
    from known.registry import PYFUNC_PACKAGE  # the package each MLflow version of KNOWN carries: our own code

    third_party = imported - set(sys.stdlib_module_names) - {*PACKAGES, PYFUNC_PACKAGE, "__future__"} - OPTIONAL
    declared = {_name(r) for r in PROJECT["dependencies"]}
    providers = packages_distributions()
    undeclared = {m: providers.get(m) for m in third_party if not {_name(d) for d in providers.get(m, [])} & declared}
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"
    assert {"scipy", "pandas"} <= declared


def test_requires_python_has_no_upper_bound():
    assert PROJECT["requires-python"] == ">=3.11"  # 3.12 and 3.13 checked (docs/development.md)


def test_the_oblivion_command_runs_every_entry_point():
    """``python -m`` modules with a main (tests/test_cli_help.py finds them) are all ``oblivion`` commands."""
    modules = {module for module, _ in cli.COMMANDS.values() if module}
    assert set(entry_points()) <= modules
    for module in modules:
        assert "def main(" in (REPO / (module.replace(".", "/") + ".py")).read_text(), module
    assert cli.COMMANDS["collect"][0] == "collectors.launch" and cli.COMMANDS["status"][0] == "meta.status"


def test_oblivion_help_lists_the_commands_without_importing_torch_or_ray():
    code = ("import sys; from oblivion import cli; rc = cli.main(['--help']); "
            "assert not {'torch', 'ray'} & set(sys.modules), sorted(sys.modules); sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for name in cli.COMMANDS:
        assert re.search(rf"^  {name} ", run.stdout, re.M), name


def test_oblivion_dispatches_to_the_modules_main(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["status", "--help"])
    assert exit.value.code == 0
    assert "--verify" in capsys.readouterr().out  # meta.status's own parser answered
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().err
    assert cli.main(["configs"]) == 0
    assert (REPO / "configs/demo.yaml").samefile(capsys.readouterr().out.strip() + "/demo.yaml")


def _source_tree(dest):
    """The files git would commit (tracked or new, not ignored), links kept as links: a clean tree to build from."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_symlink() or src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    _source_tree(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(out)],
                   check=True, capture_output=True, timeout=300)
    [built] = out.glob("oblivion-*.whl")
    return built


def test_the_wheel_ships_the_configs_the_command_and_the_metadata(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    assert configs and {f"oblivion/{c}" for c in configs} <= names
    assert {"oblivion/cli.py", "known/weights/PROVENANCE.json", "known/native.cpp"} <= names
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(info).decode()
    assert "Requires-Python: >=3.11\n" in metadata
    requires = set(re.findall(r"^Requires-Dist: ([^;\n]+)$", metadata, re.M))
    assert {"torch==2.14.1", "torchvision==0.29.1", "scipy>=1.11", "pandas>=2.1"} <= requires
    entry = zipfile.ZipFile(wheel).read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "oblivion = oblivion.cli:main" in entry


def test_an_installed_user_runs_the_command_on_the_shipped_demo_config(wheel, tmp_path):
    """The wheel installed alone (its dependencies from this environment), run from outside the repository."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    command = [sys.executable, str(site / "bin" / "oblivion")]
    folder = subprocess.run([*command, "configs"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert folder.startswith(str(site)) and (REPO / "configs/demo.yaml").read_bytes() == open(f"{folder}/demo.yaml", "rb").read()
    check = ("import sys, collectors; from collectors.config import load_config; "
             "assert collectors.__file__.startswith(sys.argv[2]), collectors.__file__; print(load_config(sys.argv[1]).num_sweeps)")
    run = subprocess.run([sys.executable, "-c", check, f"{folder}/demo.yaml", str(site)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    help_ = subprocess.run([*command, "collect", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert help_.returncode == 0 and "--config" in help_.stdout, help_.stderr[-3000:]
