"""Failure suite on a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head with no
CPUs and two 1-CPU worker nodes): a killed worker process and a killed node lose no sweep and duplicate
none; a catalog row pointing at a missing shard is an error naming it. docs/failure-suite.md lists every
case of the suite with the test that proves it."""

import collections
import threading
import time

import pytest

from collectors.collect import collect
from collectors.config import sample_specs
from conftest import arm_victim, inject, tiny_config
from meta import catalog, readers
from meta.shards import ShardError, iter_shard
from test_collect import assert_consistent

pytestmark = pytest.mark.ray


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    ray.init(address=c.address, log_to_driver=False)  # before the worker nodes: the driver joins the head
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def _members(out) -> collections.Counter:
    """How often each sweep id appears across every published shard (catalogued or not)."""
    seen = collections.Counter()
    for p in sorted((out / "shards").glob("*.tar")):
        seen.update(s.key for s in iter_shard(str(p)))
    return seen


def test_killed_worker_process_on_a_multinode_cluster(cluster, settings, tmp_path, monkeypatch):
    out = tmp_path / "meta"
    cfg = tiny_config(num_sweeps=6)
    specs, victim, fired = arm_victim(monkeypatch, tmp_path, cfg, 2, "1")
    s = collect(specs, str(out), settings, cfg.workers, 2, False)
    assert fired()
    assert (s.done, s.failed) == (6, 0)
    assert_consistent(out, [x.sweep_id for x in specs])  # exactly the requested sweeps, each shard readable
    assert max(_members(out).values()) == 1  # no duplicate anywhere, catalogued or not
    assert {r["sweep_id"]: r["attempts"] for r in catalog.read(str(out))}[victim] == 2


def stall_in_collection(specs, out, settings, workers, tmp_path, monkeypatch, timeout: float):
    """Start ``collect`` (2 workers) in a thread with sweep ``specs[1]`` stalled at stage 1; wait until it
    stalls and return (driver thread, its result dict, the id of the node the stalled worker runs on)."""
    inject(monkeypatch, tmp_path, f"{specs[1].sweep_id}@1=hang")
    result = {}
    driver = threading.Thread(target=lambda: result.update(s=collect(specs, str(out), settings, workers, 2, False)))
    driver.start()
    marker = tmp_path / "chaos" / f"{specs[1].sweep_id}@1.node"
    deadline = time.monotonic() + timeout
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the victim sweep never reached its stage"
    return driver, result, marker.read_text()


def test_killed_node_during_collection(cluster, settings, tmp_path, monkeypatch):
    c, nodes = cluster
    out = tmp_path / "meta"
    cfg = tiny_config(num_sweeps=6)
    specs = sample_specs(cfg)
    victim = specs[1].sweep_id
    driver, result, node_id = stall_in_collection(specs, out, settings, cfg.workers, tmp_path, monkeypatch, 180)
    node = next(n for n in nodes if n.node_id == node_id)
    c.remove_node(node, allow_graceful=False)  # the whole node: raylet and every worker on it
    driver.join(timeout=300)
    assert not driver.is_alive(), "collection did not finish after losing a node"
    s = result["s"]
    assert (s.done, s.failed) == (6, 0)
    assert_consistent(out, [x.sweep_id for x in specs])
    assert max(_members(out).values()) == 1
    assert {r["sweep_id"]: r["attempts"] for r in catalog.read(str(out))}[victim] == 2


def test_catalog_row_pointing_at_a_missing_shard_is_an_error_naming_it(cluster, settings, tmp_path):
    out = tmp_path / "meta"
    cfg = tiny_config(num_sweeps=2)
    collect(sample_specs(cfg), str(out), settings, cfg.workers, 2, False)
    shard = sorted((out / "shards").glob("*.tar"))[0]
    shard.unlink()
    with pytest.raises((ShardError, FileNotFoundError), match=shard.name):
        list(readers.iter_sweeps(str(out)))
    with pytest.raises(Exception, match=shard.name):  # Ray Data (what known.train reads through) too
        readers.ray_dataset(str(out)).materialize()
