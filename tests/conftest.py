import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import fakedata  # noqa: E402

from collectors.config import parse_config  # noqa: E402
from collectors.data import DataSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


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
