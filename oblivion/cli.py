"""``oblivion COMMAND …``: one installed command for every entry point, the same ``main`` as ``python -m MODULE …``.

    oblivion data --data-root .data --download
    oblivion collect --config "$(oblivion configs)/demo.yaml" --collection runs/demo --data-root .data
    oblivion status --help

It imports a command's module only when that command runs: listing the commands costs no torch or Ray import.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

COMMANDS = {  # command -> (module whose main(argv) it runs, what it does)
    "data": ("collectors.data", "fetch the three datasets into --data-root"),
    "collect": ("collectors.launch", "collect forgetting sweeps into a meta-dataset (resumes)"),
    "status": ("meta.status", "what a meta-dataset holds and how its collection went"),
    "predictability": ("known.predictability", "how much per-coordinate signal meta-datasets carry"),
    "train": ("known.train", "meta-train KNOWN on a meta-dataset (Ray Train)"),
    "validate": ("known.validate", "validate a KNOWN: predict a recorded stage from the five after it"),
    "predict": ("known.predict", "step a model's weights back along its forgetting trajectory"),
    "registry": ("known.registry", "ship a registered or saved KNOWN to a folder (--out)"),
    "transfer": ("evaluation.transfer", "a transfer experiment: KNOW against naive transfer, in MLflow"),
    "report": ("evaluation.report", "write docs/results.md from the MLflow runs"),
    "configs": (None, "print the folder of the shipped YAML configs (demo.yaml, meta-v2.yaml, eval-*.yaml)"),
}
CONFIGS = Path(__file__).resolve().parent / "configs"  # package data; in the repository a link to configs/


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: oblivion COMMAND [ARGS …]   (oblivion COMMAND --help: its options)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"oblivion: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = COMMANDS[command][0]
    if module is None:  # configs
        print(CONFIGS)
        return 0
    return importlib.import_module(module).main(rest)
