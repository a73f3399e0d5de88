"""Elastic collection on a real Ray autoscaler: ``ray.cluster_utils.AutoscalingCluster`` (the fake multi-node
provider: "nodes" are local raylets the autoscaler launches and terminates) with a head of 0 CPUs and one
worker type of up to 3 one-CPU nodes. The collection starts with no worker CPU at all, grows with the cluster,
and survives a node removed mid-run: every sweep done, none lost, none duplicated.

The head is started as upstream's ``AutoscalingCluster.start()`` does, on free ports, and stopped without
its ``ray stop --force`` (see ``_OwnAutoscalingCluster``)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from collectors.collect import collect
from collectors.config import sample_specs
from conftest import tiny_config
from meta import catalog
from test_collect import assert_consistent
from test_failures import _members, stall_in_collection
from test_infra import _free_port

pytestmark = pytest.mark.ray

MAX_NODES = 3


def _fake_multinode_config(head_resources: dict, worker_node_types: dict) -> dict:
    """``AutoscalingCluster._generate_config`` without fake_multi_node/example.yaml (Ray 2.60's wheel lacks it)."""
    empty = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude", "rsync_filter"]
    return {
        "cluster_name": "fake_multinode", "max_workers": 8, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {**worker_node_types,
                                 "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0}},
        "head_node_type": "ray.head.default", "docker": {}, "auth": {}, "file_mounts": {},
        "file_mounts_sync_continuously": False, **{k: [] for k in empty},
    }


class _OwnAutoscalingCluster:
    """``AutoscalingCluster``'s head (``ray start --head --autoscaling-config`` with ``RAY_FAKE_CLUSTER=1``), on
    free ports and its own temp dir, stopped by ending only its own processes: upstream's start()/shutdown()
    run ``ray stop --force``, which would end every Ray cluster on the machine (a user's collection included)."""

    def __init__(self, head_cpus: int, worker_node_types: dict):
        import ray._private.services as services

        self.tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
        self.address = f"{services.get_node_ip_address()}:{_free_port()}"
        config = _fake_multinode_config({"CPU": head_cpus}, worker_node_types)
        config["provider"]["gcs_address"] = self.address  # the fake provider's nodes join this head, not :6379
        cfg = Path(self.tmp) / "autoscaling.json"
        cfg.write_text(json.dumps(config))
        self.cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--autoscaling-config={cfg}",
                    "--num-cpus", str(head_cpus), "--port", self.address.rsplit(":", 1)[1], "--temp-dir", self.tmp,
                    "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
                    *[a for flag in ("--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                     "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port")
                      for a in (flag, str(_free_port()))]]

    def start(self) -> None:
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the autoscaler calls `ray`
        env.pop("RAY_ADDRESS", None)  # (auth off: a private test cluster on free ports, as Cluster() in test_failures)
        self.head = subprocess.Popen(self.cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def shutdown(self) -> None:
        self.head.send_signal(signal.SIGTERM)
        try:
            self.head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.head.pid, signal.SIGKILL)
        # the fake nodes are raylets the autoscaler started outside the head's process group; they run in our temp dir
        for pid in subprocess.run(["pgrep", "-f", self.tmp], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def autoscaling():
    import ray

    cluster = _OwnAutoscalingCluster(0, {"cpu": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": MAX_NODES}})
    cluster.start()
    try:
        for _ in range(60):  # the GCS answers a few seconds after `ray start`
            try:
                ray.init(address=cluster.address, log_to_driver=False)
                break
            except ConnectionError:
                time.sleep(1)
        assert ray.is_initialized(), f"the autoscaling head at {cluster.address} did not come up"
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
