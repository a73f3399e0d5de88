"""infra/: cluster definitions validated offline, a real PostgreSQL-backed MLflow server, S3 via moto."""

import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def _yaml(path):
    return yaml.safe_load((INFRA / path).read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entrypoint_args(entrypoint: str) -> tuple[str, list[str]]:
    """('collectors/launch.py' or 'known.train', its arguments) of a `python …` entrypoint."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "python", entrypoint
    if argv[1] == "-m":
        return argv[2], argv[3:]
    return argv[1], argv[2:]


def test_kuberay_cluster_and_jobs_are_consistent():
    import ray

    cluster = _yaml("kuberay/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__  # the image's Ray must match the client's
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    images = {c["image"].rsplit(":", 1)[0] for t in [spec["headGroupSpec"], *groups.values()]
              for c in t["template"]["spec"]["containers"]}
    assert len(images) == 1  # one image (CPU / GPU tags)

    for name, module, parser in [("rayjob-collect.yaml", "collectors/launch.py", "collectors.launch"),
                                 ("rayjob-train.yaml", "known.train", "known.train")]:
        job = _yaml(f"kuberay/{name}")
        assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        target, args = _entrypoint_args(job["spec"]["entrypoint"])
        assert target == module
        assert (REPO / module).is_file() or (REPO / (module.replace(".", "/") + ".py")).is_file()
        # the entrypoint's flags are the CLI's own: argparse accepts them
        __import__(parser, fromlist=["parse_args"]).parse_args(args)
        if "--config" in args:
            assert (REPO / args[args.index("--config") + 1]).is_file()
        env = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in env  # Ray 2.60's token auth (docs/collection.md)


def test_ray_up_config_passes_rays_own_validation_and_a_broken_one_does_not():
    import copy

    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _yaml("ray-up/aws.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["cpu_worker"]["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    assert config["docker"]["image"].rsplit(":", 1)[0] == _yaml("kuberay/raycluster.yaml")["spec"]["headGroupSpec"][
        "template"]["spec"]["containers"][0]["image"].rsplit(":", 1)[0]


def test_the_shipped_clusters_start_empty_and_grow_to_what_the_collection_requests():
    """A 0-CPU head, 0 CPU workers at the start, autoscaling on; the collect job requests as many workers as the
    largest cluster holds (more would wait forever, fewer would leave nodes unused)."""
    import re

    from collectors.config import load_config

    spec = _yaml("kuberay/raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    cpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "cpu")
    assert cpu["minReplicas"] == cpu["replicas"] == 0
    pod_cpus = int(cpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    _, args = _entrypoint_args(_yaml("kuberay/rayjob-collect.yaml")["spec"]["entrypoint"])
    from collectors.launch import parse_args

    parsed = parse_args(args)
    per_worker = load_config(REPO / parsed.config).workers.cpus_per_worker
    assert parsed.num_workers == cpu["maxReplicas"] * pod_cpus // per_worker

    aws = _yaml("ray-up/aws.yaml")
    nodes = aws["available_node_types"]
    assert nodes[aws["head_node_type"]]["resources"] == {"CPU": 0} and nodes["cpu_worker"]["min_workers"] == 0
    assert nodes["cpu_worker"]["node_config"]["InstanceType"] == "c6i.4xlarge"  # 16 vCPUs
    [requested] = set(re.findall(r"--num-workers (\d+)", (INFRA / "ray-up/aws.yaml").read_text()))
    assert int(requested) == nodes["cpu_worker"]["max_workers"] * 16 // per_worker


def test_datasets_are_staged_where_the_containers_can_read_them():
    """`ray up`: /data is mounted read-only into the container, so it is filled on the host
    (initialization_commands), never from setup_commands (which run inside the container). KubeRay: the Ray
    pods mount the volume read-only; a separate Job fills it read-write."""
    aws = _yaml("ray-up/aws.yaml")
    assert "-v /data:/data:ro" in aws["docker"]["run_options"]
    in_container = [c for k in ("setup_commands", "head_setup_commands", "worker_setup_commands") for c in aws[k]]
    assert not [c for c in in_container if "/data" in c]
    assert any("aws s3 sync" in c and "/data/" in c for c in aws["initialization_commands"])

    spec = _yaml("kuberay/raycluster.yaml")["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "oblivion-data", "readOnly": True}
        assert pod["containers"][0]["volumeMounts"] == [{"name": "data", "mountPath": "/data", "readOnly": True}]
    stage = _yaml("kuberay/stage-data.yaml")
    pod = stage["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "oblivion-data"
    assert not pod["containers"][0]["volumeMounts"][0].get("readOnly") and "/data/" in pod["containers"][0]["command"][-1]


def test_dockerfile_matches_the_pinned_stack_and_the_repo():
    import ray

    text = (INFRA / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-py311" in text
    for line in text.splitlines():
        if line.startswith("COPY") and "--chown" in line:
            for src in line.split()[2:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which the repo lacks"
    pins = (REPO / "pyproject.toml").read_text()
    assert '"torch==2.14.1"' in pins and '"torchvision==0.29.1"' in pins
    assert "pip install --no-cache-dir -e ." in text  # the image installs the pinned pyproject
    assert "install -y --no-install-recommends g++" in text  # builds KNOWN's native kernel on each node


def _pg_available() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/initdb")) and shutil.which("runuser") is not None


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.mark.ray
@pytest.mark.skipif(not _pg_available(), reason="PostgreSQL is not installed (apt-get install postgresql; `make test` does it when it can)")
def test_team_mlflow_server_on_postgres(tmp_path, fake_root, ray_local):
    """infra/mlflow/start.sh: a real PostgreSQL + MLflow server; a small evaluation and a KNOWN registration
    over HTTP, read back (runs, metrics, models:/KNOWN@champion)."""
    import mlflow
    from mlflow import MlflowClient

    from evaluation import transfer
    from known import registry

    port, pg_port = _free_port(), _free_port()
    state = Path(f"/tmp/oblivion-mlflow-{os.getpid()}")
    env = {**os.environ, "MLFLOW_PORT": str(port), "PG_PORT": str(pg_port), "MLFLOW": str(Path(os.sys.executable).parent / "mlflow")}
    proc = subprocess.Popen([str(INFRA / "mlflow/start.sh"), str(state)], env=env, cwd=REPO, start_new_session=True,
                            stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", proc, 300)
        import test_evaluation

        cfg = tmp_path / "tiny.yaml"
        cfg.write_text(yaml.safe_dump(test_evaluation.BASE))
        assert transfer.main(["--config", str(cfg), "--data-root", str(fake_root), "--tracking-uri", uri]) == 0
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(transfer.EXPERIMENT)
        runs = client.search_runs([exp.experiment_id])
        parent = next(r for r in runs if r.data.tags.get(transfer.ROLE_TAG) == "experiment")
        assert "naive.full_mean" in parent.data.metrics
        assert sum(r.data.tags.get(transfer.ROLE_TAG) == "finetune" for r in runs) == 22  # 11 initialisations × 2 seeds
        assert "summary.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}

        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("known-meta-training")
        models = registry.fresh(5)
        with mlflow.start_run():
            version, champion, _ = registry.publish(models, 0.9, {registry.VAL_DIGEST: "v"}, uri)
        assert champion
        got = registry.load_predictor("known", f"models:/{registry.MODEL_NAME}@{registry.ALIAS}", uri)
        import torch

        w = torch.randn(8, 5)
        with torch.no_grad():
            assert torch.equal(got["conv"].step(w), models["conv"].step(w))
        assert (state / "pg" / "PG_VERSION").is_file()  # the backend store really is PostgreSQL
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(state, ignore_errors=True)
    with pytest.raises(OSError):  # stopped: nothing answers any more
        urllib.request.urlopen(f"{uri}/health", timeout=3)
