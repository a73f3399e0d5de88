"""A Ray autoscaler with fake nodes on this machine, for tests and ``bench/scale.py``: the elasticity of a
collection (a cluster that grows from no worker CPU, nodes that come and go) measured without a cloud.

It is ``ray.cluster_utils.AutoscalingCluster`` (the fake multi-node provider: "nodes" are local raylets the
autoscaler launches and terminates), started on free ports in its own temp dir and stopped by ending only its
own processes: upstream's start()/shutdown() run ``ray stop --force``, which would end every Ray cluster on the
machine (a user's collection included), and Ray 2.60's wheel lacks the example.yaml its config is built from.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(head_resources: dict, worker_node_types: dict) -> dict:
    """``AutoscalingCluster._generate_config`` without fake_multi_node/example.yaml."""
    empty = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude", "rsync_filter"]
    max_workers = sum(t.get("max_workers", 0) for t in worker_node_types.values())
    return {
        "cluster_name": "fake_multinode", "max_workers": max_workers, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {**worker_node_types,
                                 "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0}},
        "head_node_type": "ray.head.default", "docker": {}, "auth": {}, "file_mounts": {},
        "file_mounts_sync_continuously": False, **{k: [] for k in empty},
    }


class FakeAutoscalingCluster:
    """A head of ``head_cpus`` whose autoscaler adds nodes of ``worker_node_types`` (the cluster YAML's
    ``available_node_types``) on demand. Token auth is off: a private cluster on free ports."""

    def __init__(self, head_cpus: int, worker_node_types: dict):
        import ray._private.services as services

        self.tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
        self.address = f"{services.get_node_ip_address()}:{free_port()}"
        config = _config({"CPU": head_cpus}, worker_node_types)
        config["provider"]["gcs_address"] = self.address  # the fake provider's nodes join this head, not :6379
        cfg = Path(self.tmp) / "autoscaling.json"
        cfg.write_text(json.dumps(config))
        self.cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--autoscaling-config={cfg}",
                    "--num-cpus", str(head_cpus), "--port", self.address.rsplit(":", 1)[1], "--temp-dir", self.tmp,
                    "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
                    *[a for flag in ("--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                     "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port")
                      for a in (flag, str(free_port()))]]

    def start(self) -> None:
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the autoscaler calls `ray`
        env.pop("RAY_ADDRESS", None)
        self.head = subprocess.Popen(self.cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def connect(self, timeout_s: float = 60) -> None:
        """``ray.init`` to the head once its GCS answers (a few seconds after ``ray start``)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while not ray.is_initialized():
            try:
                ray.init(address=self.address, log_to_driver=False)
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

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
