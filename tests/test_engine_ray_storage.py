"""--engine ray with every location in a bucket (issue 10, item 5 on the Ray engine): a loopback moto S3
server and a loopback Ray cluster, both started by this module and stopped at its end. The cluster starts
after the test credentials and endpoint are in the environment, so its worker processes inherit them (as the
nodes of a real cluster carry their own credentials)."""

from __future__ import annotations

import os

import pytest

# Before ray is imported (as segcli.engines.ray_cluster.import_ray does): keep every Ray process on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
pytest.importorskip("ray")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
pytestmark = pytest.mark.slow  # a loopback Ray cluster and an S3 server

from segcli.io import storage  # noqa: E402
from segcli.io.storage import ObjectPath  # noqa: E402
from tests.cli_helpers import cli, ok, pngs  # noqa: E402
from tests.ray_helpers import LoopbackCluster, assert_loopback  # noqa: E402
from tests.test_storage import dataset, method_args, objects, s3_server  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="module")
def s3_and_ray(s3_server):  # noqa: F811
    import s3fs

    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                     "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
            mp.delenv(name, raising=False)
        for name, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/c",
                            "AWS_CONFIG_FILE": "/nonexistent/config", "NO_PROXY": "127.0.0.1,localhost"}.items():
            mp.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = storage.filesystem(ObjectPath("s3://bkt"))
        if not fs.exists("bkt"):
            fs.mkdir("bkt")
        cluster = LoopbackCluster(num_cpus=2)
        try:
            yield fs, cluster.ray
        finally:
            cluster.stop()
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_ray_engine_reads_and_writes_a_bucket_like_the_local_engine(s3_and_ray, dataset, tmp_path):  # noqa: F811
    """Inputs, --cache, --out (model), --masks and --overlay on S3 with --engine ray: the model and the masks of
    the local engine on local files, byte for byte; a rerun keeps the finished masks; no temporary object."""
    from segcli.method.model import SegModel

    fs, ray = s3_and_ray
    fs.put(str(dataset), "bkt/rimages", recursive=True)
    local = tmp_path / "local"
    ok(cli("cluster-dataset", dataset, "--out", local / "model.segcli", "--masks", local / "masks",
           "--cache", local / "cache", *method_args()))
    args = ["cluster-dataset", "s3://bkt/rimages", "--out", "s3://bkt/r/model.segcli", "--masks", "s3://bkt/r/masks",
            "--overlay", "s3://bkt/r/overlay", "--cache", "s3://bkt/r/cache", "--engine", "ray",
            "--cpus-per-worker", "0.5", *method_args()]
    ok(cli(*args))
    assert SegModel.load("s3://bkt/r/model.segcli").digest() == SegModel.load(local / "model.segcli").digest()
    want = pngs(local / "masks")
    assert len(want) == 5
    assert {k: v for k, v in objects(fs, "bkt/r/masks").items() if k.endswith(".png")} == want
    assert len(objects(fs, "bkt/r/overlay")) == 5
    assert storage.list_files(ObjectPath("s3://bkt/r/cache"))
    assert not [n for n in fs.find("bkt") if n.endswith(".tmp")], "a temporary object became visible"
    r = ok(cli(*args))
    assert "5 kept" in r.output
    assert_loopback(ray)
