"""Bad input, swept over every command line in process: exit status 2, one line ``error: …`` on stderr naming
the bad value, no traceback, and nothing written or changed (the workspace and the working folder are compared
file by file before and after; an MLflow lookup must not leave an mlflow.db behind)."""

import hashlib
import importlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, tiny_config
from meta import catalog
from meta.shards import FORMAT_VERSION, ShardWriter, encode_sample

CLIS = {"launch": "collectors.launch", "data": "collectors.data", "status": "meta.status",
        "predictability": "known.predictability", "predict": "known.predict", "train": "known.train",
        "validate": "known.validate", "registry": "known.registry", "report": "evaluation.report",
        "transfer": "evaluation.transfer"}
MARKER = "unpickled"  # what the pickle below creates if anything ever unpickles it


class Exploit:
    """A pickle that creates MARKER in the working folder when it is loaded."""

    def __reduce__(self):
        return open, (MARKER, "w")


def _collection(root: Path, n_stages: int = 6, numel: int = 64) -> Path:
    """One done sweep in one shard, written without Ray: enough for every reader's checks."""
    tensors = {"conv.weight": torch.randn(n_stages, numel)}
    record = {"format": FORMAT_VERSION, "sweep_id": "a" * 16, "n_stages": n_stages, "n_params": numel, "wall_s": 1.0,
              "spec": {"family": "cnn", "dataset": "mnist"}, "versions": {},
              "stages": [{"stage": k, "subset_size": 100 >> k, "steps": 4, "train_loss": 1.0, "train_acc": 0.5,
                          "test_loss": 1.0, "test_acc": 0.9, "wall_s": 0.1} for k in range(n_stages)],
              "tensors": [{"name": "conv.weight", "shape": [numel], "dtype": "float32", "kind": "conv"}]}
    with ShardWriter(str(root / catalog.SHARDS_DIR), "w0") as w:
        w.write(encode_sample(record, tensors))
    catalog.write(str(root), [catalog.done_row(record, w.published[0])])
    return root


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> Path:
    return _collection(tmp_path_factory.mktemp("collection"))


@pytest.fixture
def ws(tmp_path, healthy, fake_root, monkeypatch) -> dict:
    """The workspace every case's arguments are formatted with; the working folder is ws/cwd."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OBLIVION_DATA", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("kept\n")
    shape = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (10, 4)}
    for k in range(5):
        save_file({n: torch.randn(s) for n, s in shape.items()}, str(tmp_path / f"s{k}.safetensors"))
    save_file({"conv.weight": torch.randn(2, 2)}, str(tmp_path / "odd.safetensors"))
    (tmp_path / "exploit.pt").write_bytes(pickle.dumps(Exploit()))
    (tmp_path / "torn.safetensors").write_bytes(b"\x00\x01 not safetensors at all")
    (tmp_path / "text.pt").write_text("a state dict, honestly\n")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "cfg.yaml").write_text(tiny_config().model_dump_json())
    (tmp_path / "broken.yaml").write_text("num_sweeps: [1,\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "bad.yaml").write_text("num_sweeps: 2\nspace: {families: [vgg], r: [0.5, 1.5]}\n")
    for name in ("coll", "torn", "flipped"):
        shutil.copytree(healthy, tmp_path / name)
    shard = next((tmp_path / "torn" / catalog.SHARDS_DIR).glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    shard = next((tmp_path / "flipped" / catalog.SHARDS_DIR).glob("*.tar"))
    blob = bytearray(shard.read_bytes())
    blob[520:620] = bytes(b ^ 0xFF for b in blob[520:620])  # same size, other bytes: only the sha256 tells
    shard.write_bytes(bytes(blob))
    return {"tmp": str(tmp_path), "data": str(fake_root), "smoke": str(REPO / "configs" / "eval-smoke.yaml")}


STAGES = ["--stages", *(f"{{tmp}}/s{k}.safetensors" for k in range(5))]
LAUNCH = ["--config", "{tmp}/cfg.yaml", "--data-root", "{data}", "--unverified-cifar10", "--no-mlflow"]
NOPE = "models:/NOPE@x"
SHIP = ["ship", "--out", "{tmp}/ship", "--model"]

# (id, CLI, arguments, text the error must contain)
CASES = [
    ("launch-config-missing", "launch", ["--config", "{tmp}/nope.yaml", "--collection", "{tmp}/o"], "nope.yaml"),
    ("launch-config-malformed", "launch", ["--config", "{tmp}/broken.yaml", "--collection", "{tmp}/o"], "broken.yaml"),
    ("launch-config-not-a-mapping", "launch", ["--config", "{tmp}/list.yaml", "--collection", "{tmp}/o"], "list.yaml"),
    ("launch-config-impossible", "launch", ["--config", "{tmp}/bad.yaml", "--collection", "{tmp}/o"], "1.5"),
    ("launch-config-is-a-folder", "launch", ["--config", "{tmp}/folder", "--collection", "{tmp}/o"], "folder"),
    ("launch-workers-zero", "launch", [*LAUNCH, "--collection", "{tmp}/o", "--workers", "0"], "--workers"),
    ("launch-workers-not-a-number", "launch", [*LAUNCH, "--collection", "{tmp}/o", "--workers", "two"], "'two'"),
    ("launch-stop-after-zero", "launch", [*LAUNCH, "--collection", "{tmp}/o", "--stop-after", "0"], "'0'"),
    ("launch-stop-after-no-unit-known", "launch", [*LAUNCH, "--collection", "{tmp}/o", "--stop-after", "2h"], "'2h'"),
    ("launch-collection-missing-flag", "launch", LAUNCH, "--collection"),
    ("launch-data-root-missing", "launch", ["--config", "{tmp}/cfg.yaml", "--collection", "{tmp}/o",
                                            "--data-root", "{tmp}/nodata"], "nodata"),
    ("launch-collection-is-a-file", "launch", [*LAUNCH, "--collection", "{tmp}/file.txt"], "file.txt"),
    ("launch-collection-under-a-file", "launch", [*LAUNCH, "--collection", "{tmp}/file.txt/o"], "file.txt"),
    ("launch-collection-unwritable", "launch", [*LAUNCH, "--collection", "/proc/oblivion-test/o"], "/proc/oblivion-test/o"),
    ("launch-collection-bad-uri", "launch", [*LAUNCH, "--collection", "nosuch://bucket/o"], "nosuch://bucket/o"),
    ("data-root-missing", "data", ["--data-root", "{tmp}/nodata"], "nodata"),
    ("status-collection-missing", "status", ["--collection", "{tmp}/nothing"], "nothing"),
    ("status-collection-is-a-file", "status", ["--collection", "{tmp}/file.txt"], "file.txt"),
    ("status-collection-bad-uri", "status", ["--collection", "nosuch://bucket/o"], "nosuch://bucket/o"),
    ("predictability-collection-missing", "predictability", ["--collection", "{tmp}/nothing", "--no-mlflow"], "nothing"),
    ("predictability-out-is-a-folder", "predictability", ["--collection", "{tmp}/coll", "--out", "{tmp}/folder",
                                                          "--no-mlflow"], "folder"),
    ("predictability-json-under-a-file", "predictability", ["--collection", "{tmp}/coll", "--json",
                                                            "{tmp}/file.txt/n.json", "--no-mlflow"], "file.txt"),
    ("predictability-out-unwritable", "predictability", ["--collection", "{tmp}/coll", "--out",
                                                         "/proc/oblivion-test/r.md", "--no-mlflow"], "/proc/oblivion-test"),
    ("predictability-truncated-shard", "predictability", ["--collection", "{tmp}/torn", "--no-mlflow"], "w0-00000.tar"),
    ("predictability-damaged-shard", "predictability", ["--collection", "{tmp}/flipped", "--no-mlflow"], "w0-00000.tar"),
    ("predictability-val-fraction", "predictability", ["--collection", "{tmp}/coll", "--val-fraction", "1.5",
                                                       "--no-mlflow"], "1.5"),
    ("predictability-known-not-in-registry", "predictability", ["--collection", "{tmp}/coll", "--known", NOPE,
                                                                "--no-mlflow"], NOPE),
    ("predictability-known-empty-folder", "predictability", ["--collection", "{tmp}/coll", "--known", "{tmp}/folder",
                                                             "--no-mlflow"], "folder"),
    ("predict-not-safetensors", "predict", [*STAGES[:-1], "{tmp}/torn.safetensors", "--out", "{tmp}/p"], "torn.safetensors"),
    ("predict-bare-pickle", "predict", [*STAGES[:-1], "{tmp}/exploit.pt", "--out", "{tmp}/p"], "exploit.pt"),
    ("predict-text-as-pt", "predict", [*STAGES[:-1], "{tmp}/text.pt", "--out", "{tmp}/p"], "text.pt"),
    ("predict-stage-missing", "predict", [*STAGES[:-1], "{tmp}/gone.safetensors", "--out", "{tmp}/p"], "gone.safetensors"),
    ("predict-stage-mismatch", "predict", [*STAGES[:-1], "{tmp}/odd.safetensors", "--out", "{tmp}/p"], "stage 4"),
    ("predict-four-stages", "predict", [*STAGES[:-1], "--out", "{tmp}/p"], "--stages"),
    ("predict-out-is-a-file", "predict", [*STAGES, "--out", "{tmp}/file.txt"], "file.txt"),
    ("predict-out-under-a-file", "predict", [*STAGES, "--out", "{tmp}/file.txt/p"], "file.txt"),
    ("predict-out-unwritable", "predict", [*STAGES, "--out", "/proc/oblivion-test/p"], "/proc/oblivion-test/p"),
    ("predict-steps-zero", "predict", [*STAGES, "--out", "{tmp}/p", "--steps", "0"], "--steps"),
    ("predict-unknown-method", "predict", [*STAGES, "--out", "{tmp}/p", "--method", "magic"], "'magic'"),
    ("predict-official-without-folder", "predict", [*STAGES, "--out", "{tmp}/p", "--method", "known-official"], "--official"),
    ("predict-official-empty-folder", "predict", [*STAGES, "--out", "{tmp}/p", "--method", "known-official",
                                                  "--official", "{tmp}/folder"], "folder"),
    ("predict-known-not-in-registry", "predict", [*STAGES, "--out", "{tmp}/p", "--known", NOPE], NOPE),
    ("predict-known-store-missing", "predict", [*STAGES, "--out", "{tmp}/p", "--known", NOPE,
                                                "--tracking-uri", "sqlite:///{tmp}/none.db"], "none.db"),
    ("predict-known-not-known-weights", "predict", [*STAGES, "--out", "{tmp}/p", "--known", "{tmp}/fake-known"], "conv.safetensors"),
    ("train-collection-missing", "train", ["--collection", "{tmp}/nothing"], "nothing"),
    ("train-truncated-shard", "train", ["--collection", "{tmp}/torn"], "w0-00000.tar"),
    ("train-storage-is-a-file", "train", ["--collection", "{tmp}/coll", "--storage", "{tmp}/file.txt"], "file.txt"),
    ("train-val-fraction", "train", ["--collection", "{tmp}/coll", "--val-fraction", "1.5"], "1.5"),
    ("train-epochs-zero", "train", ["--collection", "{tmp}/coll", "--epochs", "0"], "--epochs"),
    ("train-too-few-sweeps", "train", ["--collection", "{tmp}/coll", "--storage", "{tmp}/st"], "--val-fraction"),
    ("validate-collection-missing", "validate", ["--collection", "{tmp}/nothing"], "nothing"),
    ("validate-truncated-shard", "validate", ["--collection", "{tmp}/torn", "--data-root", "{data}"], "w0-00000.tar"),
    ("validate-damaged-shard", "validate", ["--collection", "{tmp}/flipped", "--data-root", "{data}"], "w0-00000.tar"),
    ("validate-json-is-a-folder", "validate", ["--collection", "{tmp}/coll", "--json", "{tmp}/folder"], "folder"),
    ("validate-max-sweeps-zero", "validate", ["--collection", "{tmp}/coll", "--max-sweeps", "0"], "--max-sweeps"),
    ("validate-known-not-in-registry", "validate", ["--collection", "{tmp}/coll", "--data-root", "{data}",
                                                    "--methods", "known", "--known", NOPE], NOPE),
    ("validate-data-root-missing", "validate", ["--collection", "{tmp}/coll"], "--data-root"),
    ("registry-no-command", "registry", [], "required"),
    ("registry-collection-missing", "registry", [*SHIP, "{tmp}/folder", "--collection", "{tmp}/nothing"], "nothing"),
    ("registry-model-not-in-registry", "registry", [*SHIP, NOPE, "--collection", "{tmp}/coll"], NOPE),
    ("registry-model-empty-folder", "registry", [*SHIP, "{tmp}/folder", "--collection", "{tmp}/coll"], "folder"),
    ("registry-validation-not-json", "registry", [*SHIP, "{tmp}/folder", "--collection", "{tmp}/coll",
                                                  "--validation", "{tmp}/broken.json"], "broken.json"),
    ("registry-out-is-a-file", "registry", ["ship", "--out", "{tmp}/file.txt", "--model", "{tmp}/folder",
                                            "--collection", "{tmp}/coll"], "file.txt"),
    ("report-no-store", "report", ["--out", "{tmp}/r.md"], "mlflow.db"),
    ("report-store-missing", "report", ["--out", "{tmp}/r.md", "--tracking-uri", "sqlite:///{tmp}/none.db"], "none.db"),
    ("report-out-is-a-folder", "report", ["--out", "{tmp}/folder"], "folder"),
    ("report-out-under-a-file", "report", ["--out", "{tmp}/file.txt/r.md"], "file.txt"),
    ("transfer-config-missing", "transfer", ["--config", "{tmp}/nope.yaml", "--data-root", "{data}"], "nope.yaml"),
    ("transfer-config-malformed", "transfer", ["--config", "{tmp}/broken.yaml", "--data-root", "{data}"], "broken.yaml"),
    ("transfer-workers-zero", "transfer", ["--config", "{smoke}", "--data-root", "{data}", "--workers", "0"], "--workers"),
    ("transfer-data-root-missing", "transfer", ["--config", "{smoke}", "--data-root", "{tmp}/nodata"], "nodata"),
]


def _snapshot(*roots: Path) -> dict:
    """Every file and folder under ``roots``: file contents by hash, with size and modification time."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) if p.is_file() else "dir"
    return out


def _run(cli: str, argv: list[str], capsys) -> tuple[int, str]:
    main = importlib.import_module(CLIS[cli]).main
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("cli, argv, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(ws, cli, argv, needle, capsys):
    fake_known = Path(ws["tmp"]) / "fake-known"
    fake_known.mkdir()
    for kind in ("conv", "linear", "bias"):
        save_file({"w": torch.zeros(2)}, str(fake_known / f"{kind}.safetensors"))
    watched = (Path(ws["tmp"]), REPO / "known" / "weights")
    before = _snapshot(*watched)
    code, err = _run(cli, [a.format(**ws) for a in argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.format(**ws) in lines[0]
    assert "Traceback" not in err
    assert _snapshot(*watched) == before


def test_there_are_enough_cases_and_every_cli_has_some():
    assert len(CASES) >= 30
    assert {c[1] for c in CASES} == set(CLIS)
    from test_cli_help import MODULES

    assert set(CLIS.values()) == set(MODULES)


def test_a_collection_given_as_its_shards_folder_is_understood(ws, capsys):
    from meta import status

    assert status.main(["--collection", f"{ws['tmp']}/coll/shards"]) == 0
    assert "1 done" in capsys.readouterr().out


@pytest.mark.parametrize("cli, argv, dest, value", [
    ("launch", ["--config", "c", "--out", "o", "--num-workers", "3"], "collection", "o"),
    ("train", ["--shards", "c", "--num-workers", "3"], "workers", 3),
    ("data", ["--root", "r"], "data_root", "r"),
    ("status", ["c"], "collection", "c"),
    ("predictability", ["a", "b"], "collection", ["a", "b"]),
])
def test_old_spellings_still_work(cli, argv, dest, value, monkeypatch):
    """Hidden aliases, kept for a release: the parsed arguments are those of the new flags."""
    import argparse

    seen = {}
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, args=None, ns=None: seen.update(vars(self.parse_known_args(args, ns)[0])) or exit(0))
    with pytest.raises(SystemExit):
        importlib.import_module(CLIS[cli]).main(argv)
    assert seen[dest] == value
