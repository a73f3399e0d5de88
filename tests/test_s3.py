"""Object storage through the same URI code path as local folders, against a local S3-compatible endpoint
(moto's standalone server): collection, resume and readers on s3://."""

import os
import subprocess
from pathlib import Path

import pytest

from collectors.fake_cluster import free_port
from test_infra import _wait_http

@pytest.fixture(scope="module")
def s3_ray():
    """A moto S3 endpoint with a bucket, credentials in the environment *before* Ray starts (workers inherit
    the environment of the cluster they join: on a real cluster, set them on every node), then Ray."""
    pytest.importorskip("moto")
    import ray

    port = free_port()
    moto = Path(os.sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    try:
        _wait_http(f"http://127.0.0.1:{port}/moto-api/", proc, 60)
        from pyarrow import fs

        s3 = fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1", allow_bucket_creation=True)
        s3.create_dir("oblivion")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        ray.shutdown()
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.ray
def test_collection_and_readers_through_s3(s3_ray, settings):
    """Shards and catalog on an S3 endpoint through the same URI code path as local folders."""
    from conftest import tiny_config

    from collectors.collect import collect
    from collectors.config import sample_specs
    from meta import catalog, readers

    out = f"s3://oblivion/meta?{s3_ray}"
    cfg = tiny_config(num_sweeps=2)
    summary = collect(sample_specs(cfg), out, settings, cfg.workers, 2, False)
    assert summary.done == 2
    rows = catalog.read(out)
    assert sorted(r["sweep_id"] for r in rows) == sorted(s.sweep_id for s in sample_specs(cfg))
    samples = list(readers.iter_sweeps(out))  # verifies every shard's sha256
    assert len(samples) == 2 and all(s.tensors for s in samples)
    assert readers.ray_dataset(out).count() == 2
    # resume against S3: nothing to redo
    again = collect(sample_specs(cfg), out, settings, cfg.workers, 2, False)
    assert (again.skipped, again.done) == (2, 0) and len(catalog.read(out)) == 2
    # the live view of an s3:// output
    from meta import status

    st = status.status(out)
    assert (st.done, st.failed) == (2, 0) and st.shard_bytes > 0 and "2 done, 0 failed" in status.text(st)
