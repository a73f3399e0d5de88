import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train hands a worker's report to its controller only when the controller polls (every 2 s by default), and
# a worker's second report waits for the first: tests that checkpoint every few steps spent half their time there
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

import fakedata  # noqa: E402

from collectors.config import parse_config  # noqa: E402
from collectors.data import DataSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# `make test` hands whole files to its xdist workers in collection order (--no-loadscope-reorder): the files holding
# the longest tests go first, so that no worker ends the run on a ten-minute test while the other idles
LONGEST_FIRST = ("test_known_train.py", "test_collect.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory) -> Path:
    return fakedata.write_all(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def settings(fake_root) -> DataSettings:
    return DataSettings(str(fake_root), unverified_cifar10=True)


def tiny_config(**over):
    """A config whose sweeps take about a second each on the fake data."""
    raw = {
        "seed": 3,
        "num_sweeps": 4,
        "space": {"train_size": 160, "test_size": 64, "r": [0.6, 0.8], "pretrain_epochs": 1,
                  "batch_size": [32, 64], "lr": [1.0e-3, 3.0e-3], "families": ["cnn", "resnet"]},
        "workers": {"shard_max_seconds": 0},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            raw[section] = {**raw[section], field: value}
        else:
            raw[key] = value
    return parse_config(raw)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def real_root(tmp_path_factory):
    """The real datasets: $OBLIVION_DATA if it holds them, else ../shared/data unpacked (about 12 s)."""
    from collectors import data

    env = os.environ.get("OBLIVION_DATA")
    if env and all((Path(env) / f).is_file() for d in data.DATASETS.values() for f in d.files):
        return Path(env)
    extract = REPO.parent / "shared" / "data" / "extract.sh"
    if not extract.exists():
        pytest.skip("no real data: set OBLIVION_DATA or provide ../shared/data")
    root = tmp_path_factory.mktemp("real")
    subprocess.run([str(extract), str(root)], check=True, capture_output=True, timeout=300)
    return root


def inject(monkeypatch, tmp_path, *faults: str) -> None:
    """Arm collectors.chaos for the sweeps' workers: each fault is ``<sweep id>@<stage|write>[=hang]``."""
    from collectors import chaos

    monkeypatch.setenv(chaos.ENV, f"{tmp_path / 'chaos'}:{','.join(faults)}")



def arm_victim(monkeypatch, tmp_path, cfg, index: int, *at: str):
    """``inject`` a fault into the ``index``-th sweep of ``cfg`` at each of ``at`` (a stage number, "write"):
    the sweeps, the victim's id, and a check that every armed fault really fired."""
    from collectors.config import sample_specs

    specs = sample_specs(cfg)
    victim = specs[index].sweep_id
    inject(monkeypatch, tmp_path, *(f"{victim}@{a}" for a in at))
    return specs, victim, lambda: all((tmp_path / "chaos" / f"{victim}@{a}.fired").exists() for a in at)

def described(*inits: str) -> dict[str, dict]:
    """Init descriptions as the transfer experiment records them, from their names: ``naive``, ``oracle-x<m>``,
    ``shrink-<method>-<k>`` and ``<method>-<k>`` (k steps back: multiplier 2^k)."""
    out = {}
    for name in inits:
        head, _, last = name.rpartition("-")
        if name == "naive":
            out[name] = {"method": "naive", "step": 0, "multiplier": 1}
        elif name.startswith("oracle-x"):
            m = int(name.removeprefix("oracle-x"))
            out[name] = {"method": "oracle", "step": m.bit_length() - 1, "multiplier": m}
        elif head.startswith("shrink-"):
            out[name] = {"method": "shrink", "matches": head.removeprefix("shrink-"), "step": int(last),
                         "multiplier": 2 ** int(last)}
        else:
            out[name] = {"method": head, "step": int(last), "multiplier": 2 ** int(last)}
    return out


def fake_results(lift: dict[str, float], pretrain_seeds, seeds, noise) -> list[dict]:
    """Fine-tune results for the summary's tests: every init of ``lift`` (init -> accuracy it adds) on every
    pre-trained model × downstream seed, head 0.6 and full 0.7 plus ``noise(init, pretrain_seed, seed)`` ->
    (head, full) deviations."""
    rows = []
    for p in pretrain_seeds:
        for s in seeds:
            for i, up in lift.items():
                dh, df = noise(i, p, s)
                rows.append({"init": i, "pretrain_seed": p, "seed": s, "acc_head": 0.6 + up + dh, "acc_full": 0.7 + up + df})
    return rows
