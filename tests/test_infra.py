"""infra/: cluster definitions validated offline, a real PostgreSQL-backed MLflow server, S3 via moto."""

import os
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from collectors.fake_cluster import free_port

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def _yaml(path):
    return yaml.safe_load((INFRA / path).read_text())


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
        submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"]
        assert submitter == spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]  # same image, same code
    _, args = _entrypoint_args(_yaml("kuberay/rayjob-collect.yaml")["spec"]["entrypoint"])
    assert args[args.index("--config") + 1] == "configs/meta-v2.yaml"  # the shipped KNOWN's meta-dataset


def _auth(container) -> tuple:
    """A container's Ray authentication: (RAY_AUTH_MODE, where RAY_AUTH_TOKEN comes from)."""
    env = {e["name"]: e for e in container.get("env", [])}
    token = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    return env.get("RAY_AUTH_MODE", {}).get("value"), token and (token["name"], token["key"])


def test_token_auth_is_the_same_in_every_pod_the_submitters_and_the_image():
    """Ray 2.60 turns token auth on: every head, worker and submitter container gets the mode and the one token from
    the same secret (a pod without it could not join or submit), the operator gets that secret through authOptions,
    and the image's default mode agrees."""
    spec = _yaml("kuberay/raycluster.yaml")["spec"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    containers = [c for g in pods for c in g["template"]["spec"]["containers"]]
    for job in ("rayjob-collect.yaml", "rayjob-train.yaml"):
        containers += _yaml(f"kuberay/{job}")["spec"]["submitterPodTemplate"]["spec"]["containers"]
    secret = spec["authOptions"]["secretName"]
    assert spec["authOptions"]["mode"] == "token"
    assert {_auth(c) for c in containers} == {("token", (secret, "auth_token"))}  # KubeRay's key for the token
    assert "RAY_AUTH_MODE=token" in (INFRA / "Dockerfile").read_text()
    assert f"kubectl create secret generic {secret} --from-literal=auth_token=" in (INFRA / "README.md").read_text()


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
    assert parsed.workers == cpu["maxReplicas"] * pod_cpus // per_worker

    aws = _yaml("ray-up/aws.yaml")
    nodes = aws["available_node_types"]
    assert nodes[aws["head_node_type"]]["resources"] == {"CPU": 0} and nodes["cpu_worker"]["min_workers"] == 0
    assert nodes["cpu_worker"]["node_config"]["InstanceType"] == "c6i.4xlarge"  # 16 vCPUs
    [requested] = set(re.findall(r"--workers (\d+)", (INFRA / "ray-up/aws.yaml").read_text()))
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


def _dockerfile_install(flavor: str) -> subprocess.CompletedProcess:
    """The Dockerfile's pip step run by sh with FLAVOR=flavor, `pip` echoing its arguments instead of installing."""
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    [step] = [line.removeprefix("RUN ") for line in text.splitlines() if line.startswith("RUN ") and "pip install" in line]
    return subprocess.run(["sh", "-c", f"pip() {{ echo pip \"$@\"; }}; {step}"], env={**os.environ, "FLAVOR": flavor},
                          capture_output=True, text=True, timeout=30)


def test_dockerfile_matches_the_pinned_stack_and_the_repo():
    import tomllib

    import ray

    text = (INFRA / "Dockerfile").read_text()
    args = dict(line.split()[1].split("=") for line in text.splitlines() if line.startswith("ARG ") and "=" in line)
    [base] = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert args["FLAVOR"] == "cpu"  # CPU by default; FLAVOR=gpu for the GPU worker group
    for flavor in ("cpu", "gpu"):
        assert base.replace("${FLAVOR}", flavor) == f"rayproject/ray:{ray.__version__}-py311-{flavor}"
    for line in text.splitlines():
        if line.startswith("COPY") and "--chown" in line:
            for src in line.split()[2:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which the repo lacks"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(project["dependencies"])

    cpu, gpu, bad = (_dockerfile_install(f) for f in ("cpu", "gpu", "tpu"))
    assert cpu.returncode == gpu.returncode == 0, cpu.stderr + gpu.stderr
    cpu, gpu = (shlex.split(run.stdout) for run in (cpu, gpu))
    assert cpu[cpu.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"  # no CUDA libraries
    assert "--extra-index-url" not in gpu  # PyPI's torch: the CUDA build
    assert bad.returncode == 1 and "FLAVOR must be cpu or gpu" in bad.stderr
    for argv in (cpu, gpu):  # the pinned pyproject, editable, with its infra extra (boto3, psycopg2)
        assert argv[argv.index("-e") + 1] == ".[infra]" and "infra" in project["optional-dependencies"]
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

    port, pg_port = free_port(), free_port()
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
        models = registry.fresh(5, "scaled")
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
