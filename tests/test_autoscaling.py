"""Elastic collection on a real Ray autoscaler: ``ray.cluster_utils.AutoscalingCluster`` (the fake multi-node
provider: "nodes" are local raylets the autoscaler launches and terminates) with a head of 0 CPUs and one
worker type of up to 3 one-CPU nodes. The collection starts with no worker CPU at all, grows with the cluster,
and survives a node removed mid-run: every sweep done, none lost, none duplicated.

The cluster is ``collectors.fake_cluster.FakeAutoscalingCluster``: upstream's, on free ports, stopped without
its ``ray stop --force``."""

import os
import subprocess
import threading
import time

import pytest

from collectors.collect import collect
from collectors.config import sample_specs
from collectors.fake_cluster import FakeAutoscalingCluster
from conftest import tiny_config
from meta import catalog
from test_collect import assert_consistent
from test_failures import _members, stall_in_collection

pytestmark = [pytest.mark.ray, pytest.mark.solo]

MAX_NODES = 3


@pytest.fixture
def autoscaling():
    import ray

    cluster = FakeAutoscalingCluster(0, {"cpu": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": MAX_NODES}})
    cluster.start()
    try:
        cluster.connect()
        assert ray.cluster_resources().get("CPU", 0) == 0  # nothing to run a sweep on, yet
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()


def _cpu_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def test_collection_starts_on_an_empty_cluster_and_grows_with_it(autoscaling, settings, tmp_path):
    ray = autoscaling
    out = tmp_path / "meta"
    cfg = tiny_config(num_sweeps=6)
    specs = sample_specs(cfg)
    t0 = time.monotonic()
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], len(_cpu_nodes(ray)))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        s = collect(specs, str(out), settings, cfg.workers, MAX_NODES, False)
    finally:
        stop.set()
        watcher.join()
    print(f"autoscaling: 6 sweeps from 0 CPUs on up to {peak[0]} fake nodes in {time.monotonic() - t0:.1f} s")
    assert (s.done, s.failed) == (6, 0)
    assert peak[0] == MAX_NODES  # the cluster really grew to what was asked for
    assert_consistent(out, [x.sweep_id for x in specs])
    assert max(_members(out).values()) == 1


def test_a_node_removed_mid_run_costs_nothing(autoscaling, settings, tmp_path, monkeypatch):
    """The autoscaler's node is killed under a running sweep: the sweep is retried, the replacement worker
    waits for (and gets) a new node, nothing is lost or duplicated."""
    ray = autoscaling
    out = tmp_path / "meta"
    cfg = tiny_config(num_sweeps=6)
    specs = sample_specs(cfg)
    victim = specs[1].sweep_id
    t0 = time.monotonic()
    driver, result, node_id = stall_in_collection(specs, out, settings, cfg.workers, tmp_path, monkeypatch, 240)
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    # a fake node is a raylet process group on this machine: kill it as a cloud would take the VM away
    raylet = subprocess.run(["pgrep", "-f", f"raylet.*--node_id={node['NodeID']}"], capture_output=True, text=True).stdout.split()
    assert raylet, f"no raylet process for node {node['NodeID']}"
    for pid in raylet:
        os.kill(int(pid), 9)
    driver.join(timeout=300)
    assert not driver.is_alive(), "collection did not finish after losing a node"
    print(f"autoscaling: node loss run took {time.monotonic() - t0:.1f} s")
    s = result["s"]
    assert (s.done, s.failed) == (6, 0)
    assert_consistent(out, [x.sweep_id for x in specs])
    assert max(_members(out).values()) == 1
    assert {r["sweep_id"]: r["attempts"] for r in catalog.read(str(out))}[victim] == 2
