"""Data in object stores (README "Data in object stores"): s3:// and gs:// URIs for inputs, --cache, --out,
--overlay, --masks and --model, through segcli.io.storage.

The S3 tests run against an S3-compatible server (moto's server mode) started here on 127.0.0.1 and stopped at
the end; every request goes to it (AWS_ENDPOINT_URL), never to the network. gs:// shares every code path above
fsspec's protocol dispatch with s3://; it is run end to end against a GCS emulator (gcp-storage-emulator) on
127.0.0.1 when that is installed (the test extra), and its dispatch to gcsfs is checked without one.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli.io import storage
from segcli.errors import BadImageError, InputError, UsageError
from segcli.io.images import discover_images
from segcli.io.storage import ObjectPath
from tests.cli_helpers import cli, ok, pngs

SERVER_LIMIT_S = 900  # the server is stopped after this long whatever happens to the tests


# ------------------------------------------------------------------------------------------------ no server


def test_object_paths_behave_like_posix_paths():
    p = ObjectPath("s3://bucket/a/b/img.v1.png")
    assert str(p) == "s3://bucket/a/b/img.v1.png"
    assert (p.bucket, p.name, p.stem, p.suffix) == ("bucket", "img.v1.png", "img.v1", ".png")
    assert p.parent == ObjectPath("s3://bucket/a/b") and p.parent / "img.v1.png" == p
    assert p.parents == [ObjectPath("s3://bucket/a/b"), ObjectPath("s3://bucket/a"), ObjectPath("s3://bucket")]
    assert p.relative_to(ObjectPath("s3://bucket/a")) == "b/img.v1.png"
    assert ObjectPath("s3a://bucket//a/./b/") == ObjectPath("s3://bucket/a/b")  # canonical form
    assert ObjectPath("gcs://b/k") == ObjectPath("gs://b/k") and ObjectPath("gs://b/k") != ObjectPath("s3://b/k")
    assert pickle.loads(pickle.dumps(p)) == p and hash(pickle.loads(pickle.dumps(p))) == hash(p)
    assert storage.location("s3://bucket/x") == ObjectPath("s3://bucket/x")
    assert storage.location("rel/dir") == Path("rel/dir") and storage.location(Path("/abs")) == Path("/abs")
    with pytest.raises(TypeError):  # never mistaken for a local path by open() or Path()
        Path(p)
    for bad in ("http://host/x", "s3://", "s3://bucket/../x"):
        with pytest.raises(UsageError):
            ObjectPath(bad)


def test_local_paths_never_import_the_object_store_packages(tmp_path):
    """The local fast path: listing, reading, caching and writing local files imports no fsspec backend."""
    code = f"""
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from segcli.io import storage
from segcli.io.cache import EntryStore
from segcli.io.images import content_digest, discover_images, load_image
from segcli.io.outputs import atomic_write, is_complete_png, prepare_output_dir, save_label_png
root = Path({str(tmp_path)!r})
(root / "in").mkdir()
Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "in" / "a.png")
items = discover_images(root / "in")
load_image(items[0].path); content_digest(items[0].path)
store = EntryStore(root / "cache", "x")
store.save("ab" * 32, {{"a": np.zeros(3)}})
out = prepare_output_dir(root / "out")
save_label_png(out / "a.png", np.zeros((4, 4), np.uint8))
assert is_complete_png(out / "a.png") and storage.is_file(out / "a.png")
print(",".join(m for m in ("fsspec", "s3fs", "gcsfs", "botocore", "aiobotocore") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_a_uri_with_an_unknown_scheme_is_one_usage_line(tmp_path):
    r = cli("segment", tmp_path, "--out", "http://example.com/out", "--quiet")
    assert r.exit_code == 2
    assert "unsupported URI" in r.output and "Traceback" not in r.output


def test_gs_uris_dispatch_to_gcsfs(monkeypatch):
    """gs:// (and gcs://) reach fsspec's GCS backend; nothing is sent anywhere (anonymous, no request made)."""
    gcsfs = pytest.importorskip("gcsfs")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # should anything be sent: loopback only
    import fsspec

    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        fs = storage.filesystem(ObjectPath("gcs://bucket/key"))
        assert isinstance(fs, gcsfs.GCSFileSystem)
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.mark.parametrize("missing", ["fsspec", "s3fs"])
def test_without_the_cloud_extra_a_uri_is_one_line(tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` fail
    if missing == "s3fs":
        pytest.importorskip("fsspec")
        import fsspec.registry  # noqa: F401

        # forget the class imported earlier in this process
        monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    r = cli("segment", "s3://bucket/images", "--out", tmp_path / "out", "--quiet")
    assert r.exit_code == 2, r.output
    assert "s3:// paths need the cloud extra" in r.output and "pip install 'segcli[cloud]'" in r.output
    assert len(r.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ S3 server


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port), stopped at the end of the module or after SERVER_LIMIT_S."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on stderr
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    watchdog = threading.Timer(SERVER_LIMIT_S, server.stop)
    watchdog.daemon = True
    watchdog.start()
    try:
        host, port = server.get_host_and_port()
        assert ipaddress.ip_address(host).is_loopback, host
        yield f"http://{host}:{port}"
    finally:
        watchdog.cancel()
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Credentials and endpoint for this test only, pointing at the loopback server; a fresh bucket 'bkt'."""
    import s3fs

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # botocore never asks 169.254.169.254
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    s3fs.S3FileSystem.clear_instance_cache()  # instances remember the endpoint and credentials
    fs = storage.filesystem(ObjectPath("s3://bkt"))
    if fs.exists("bkt"):
        fs.rm("bkt", recursive=True)
    fs.mkdir("bkt")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


def objects(fs, prefix: str) -> dict[str, bytes]:
    """Every object below ``prefix`` by relative name, as bytes."""
    return {name[len(prefix) + 1:]: fs.cat_file(name) for name in sorted(fs.find(prefix))}


def test_read_write_list_and_atomic_writes(s3):
    root = ObjectPath("s3://bkt/data")
    storage.put_atomic(root / "b/x.png", lambda f: f.write(b"one"))
    storage.put_atomic(root / "a.jpg", lambda f: f.write(b"two"))
    assert storage.list_files(root) == ["a.jpg", "b/x.png"]
    assert storage.read_bytes(root / "b/x.png") == b"one" and storage.size(root / "a.jpg") == 3
    assert storage.read_tail(root / "b/x.png", 2) == b"ne" and storage.read_tail(root / "nope", 2) == b""
    assert storage.is_file(root / "a.jpg") and not storage.is_file(root / "b") and storage.is_dir(root / "b")
    assert not storage.exists(root / "zzz")
    s3.mkdir("my-bucket")  # "bucket" in a name must not make a missing object read as a missing bucket
    with pytest.raises(InputError, match=r"cannot read s3://my-bucket/nope: not found$"):
        storage.read_bytes(ObjectPath("s3://my-bucket/nope"))
    with pytest.raises(InputError, match=r"cannot read s3://no-bucket/nope: the bucket does not exist$"):
        storage.read_bytes(ObjectPath("s3://no-bucket/nope"))

    def fails_halfway(f):
        f.write(b"partial data")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        storage.put_atomic(root / "c.png", fails_halfway)
    with pytest.raises(KeyboardInterrupt):
        storage.put_atomic(root / "a.jpg", lambda f: (f.write(b"x"), (_ for _ in ()).throw(KeyboardInterrupt()))[0])
    assert storage.list_files(root) == ["a.jpg", "b/x.png"]  # no partial object, no temporary, old one intact
    assert storage.read_bytes(root / "a.jpg") == b"two"

    from segcli.io.outputs import atomic_write, save_label_png

    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    save_label_png(root / "m.png", labels)
    with pytest.raises(ValueError):
        save_label_png(root / "n.png", np.full((3, 4), 300))
    with pytest.raises(ZeroDivisionError):
        atomic_write(root / "m.png", lambda f: (f.write(b"garbage"), 1 / 0))
    from segcli.io.outputs import read_label_png

    assert np.array_equal(read_label_png(root / "m.png"), labels)
    assert "n.png" not in storage.list_files(root)
    assert not [n for n in s3.find("bkt") if n.endswith(".tmp")]


def test_cache_entries_round_trip_and_a_damaged_one_is_refused(s3):
    from segcli.io.cache import EntryStore

    store = EntryStore(ObjectPath("s3://bkt/cache"), "regions/k", compressed=True)
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    digest = "ab" * 32
    store.save(digest, arrays)
    assert storage.list_files(ObjectPath("s3://bkt/cache")) == [f"regions/k/ab/{digest}.npz"]
    from segcli.io.arrays import ArraySpec

    got = store.load(digest, {"a": ArraySpec(("h", "w"), ("float32",))})
    assert np.array_equal(got["a"], arrays["a"])
    assert store.load("cd" * 32, {"a": ArraySpec(("h", "w"), ("float32",))}) is None  # absent: no error
    warnings = []
    s3.pipe_file(f"bkt/cache/regions/k/ab/{digest}.npz", b"PK\x03\x04 truncated")  # a damaged entry
    store.warn = warnings.append
    assert store.load(digest, {"a": ArraySpec(("h", "w"), ("float32",))}) is None and len(warnings) == 1


def test_discovery_lists_a_prefix_like_a_folder(s3, tmp_path):
    """Same keys, same order, same filter as the local listing of the same tree."""
    local = tmp_path / "tree"
    names = ["b.png", "a/c.JPG", "a/c.png", "a/d.jpeg", ".hidden.png", "sub/.git/x.png", "notes.txt", "z/e.webp"]
    for name in names:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(name.encode())
        s3.pipe_file(f"bkt/tree/{name}", name.encode())
    want = [(item.key, item.path.relative_to(local).as_posix()) for item in discover_images(local)]
    got = [(item.key, item.path.relative_to(ObjectPath("s3://bkt/tree"))) for item in discover_images("s3://bkt/tree")]
    assert got == want and len(got) == 5
    one = discover_images("s3://bkt/tree/b.png")
    assert [(i.key, str(i.path)) for i in one] == [("b", "s3://bkt/tree/b.png")]
    with pytest.raises(InputError, match="not found"):
        discover_images("s3://bkt/nothing-here")
    with pytest.raises(InputError, match="bucket does not exist"):
        discover_images("s3://no-such-bucket/images")


def test_voc_layout_in_a_bucket(s3):
    for name in ("JPEGImages/2007_1.jpg", "JPEGImages/2007_2.jpg", "SegmentationClass/2007_1.png",
                 "ImageSets/Segmentation/val.txt"):
        s3.pipe_file(f"bkt/voc/VOC2012/{name}", b"2007_2\n" if name.endswith(".txt") else b"x")
    assert [i.key for i in discover_images("s3://bkt/voc")] == ["2007_1", "2007_2"]
    val = discover_images("s3://bkt/voc", split="val")
    assert [(i.key, str(i.path)) for i in val] == [("2007_2", "s3://bkt/voc/VOC2012/JPEGImages/2007_2.jpg")]
    with pytest.raises(InputError, match="not found"):
        discover_images("s3://bkt/voc", split="train")


def test_reading_images_from_objects(s3, tmp_path):
    from segcli.errors import BadImageError
    from segcli.io.images import content_digest, load_image

    local = tmp_path / "im.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(local)
    s3.put_file(str(local), "bkt/im/im.png")
    s3.pipe_file("bkt/im/empty.png", b"")
    s3.pipe_file("bkt/im/bad.png", b"not a png")
    remote = ObjectPath("s3://bkt/im/im.png")
    assert np.array_equal(load_image(remote).rgb, load_image(local).rgb)
    assert content_digest(remote) == content_digest(local)
    for name, reason in (("empty.png", "empty file"), ("bad.png", "not an image"), ("gone.png", "not found")):
        with pytest.raises(BadImageError, match=reason):
            load_image(ObjectPath(f"s3://bkt/im/{name}"))
    with pytest.raises(BadImageError, match="not found"):
        content_digest(ObjectPath("s3://bkt/im/gone.png"))


# ------------------------------------------------------------------------------------------------ the CLI


SIZES = [(60, 40), (40, 60), (50, 50)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Five small pictures (one in a subfolder) and one unreadable file, on disk."""
    from tests.test_cli_backbone import scene

    root = tmp_path_factory.mktemp("s3data") / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        scene(*SIZES[i % 3], seed=500 + i).save(root / ("sub" if i == 4 else ".") / f"s{i}.png")
    return root


def method_args():
    from tests.checkpoints import TINY, checkpoint_file

    return ["--weights", checkpoint_file(TINY, "timm"), "--k", "3", "--short-side", "224", "--max-side", "448",
            "--crf-max-side", "64", "--device", "cpu", "--precision", "fp32", "--fusion", "any", "--regions",
            "whole", "--quiet"]


@pytest.mark.slow
def test_segment_on_s3_writes_the_bytes_of_a_local_run_and_resumes(s3, dataset, tmp_path):
    """cluster-dataset and segment with every location on S3 write the model and masks of a local run, byte
    for byte; a rerun keeps the finished masks; a missing or truncated mask object is redone; no temporary object."""
    from segcli.method.model import SegModel

    s3.put(str(dataset), "bkt/images", recursive=True)
    local = tmp_path / "local"
    ok(cli("cluster-dataset", dataset, "--out", local / "model.segcli", "--cache", local / "cache", *method_args()))
    ok(cli("segment", dataset, "--model", local / "model.segcli", "--out", local / "out", "--overlay",
           local / "overlay", "--cache", local / "cache", *method_args()))

    ok(cli("cluster-dataset", "s3://bkt/images", "--out", "s3://bkt/model.segcli", "--cache", "s3://bkt/cache",
           *method_args()))
    # --workers 1: the masks and overlays are written to the bucket by a worker process (spawned)
    args = ["segment", "s3://bkt/images", "--model", "s3://bkt/model.segcli", "--out", "s3://bkt/out",
            "--overlay", "s3://bkt/overlay", "--cache", "s3://bkt/cache", "--workers", "1", *method_args()]
    r = ok(cli(*args))
    assert "wrote 5 masks" in r.output

    model_local, model_s3 = SegModel.load(local / "model.segcli"), SegModel.load("s3://bkt/model.segcli")
    assert model_s3.digest() == model_local.digest()
    want = pngs(local / "out")
    assert len(want) == 5 and "sub/s4.png" in want
    got = {k: v for k, v in objects(s3, "bkt/out").items() if k.endswith(".png")}
    assert got == want
    assert objects(s3, "bkt/overlay").keys() == {p.relative_to(local / "overlay").as_posix()
                                                 for p in (local / "overlay").rglob("*.jpg")}
    assert storage.list_files(ObjectPath("s3://bkt/cache"))  # features and region bundles are in the bucket
    assert not [n for n in s3.find("bkt") if n.endswith(".tmp")], "a temporary object became visible"

    # Every object but the run record (segcli-run.json, which describes the latest run and so is written by every
    # run) is left untouched by a rerun.
    def stamps_now() -> dict:
        return {n: s3.info(n)["LastModified"] for n in s3.find("bkt/out") if not n.endswith("/segcli-run.json")}

    stamps = stamps_now()
    assert "bkt/out/segcli-run.json" in s3.find("bkt/out")
    r = ok(cli(*args))
    assert "wrote 0 masks" in r.output and "5 kept" in r.output
    assert stamps_now() == stamps

    s3.rm_file("bkt/out/s1.png")
    s3.pipe_file("bkt/out/sub/s4.png", want["sub/s4.png"][:-20])  # a truncated mask is not finished
    r = ok(cli(*args))
    assert "wrote 2 masks" in r.output and "3 kept" in r.output
    assert {k: v for k, v in objects(s3, "bkt/out").items() if k.endswith(".png")} == want


@pytest.mark.slow
def test_cluster_dataset_masks_on_s3_match_a_local_run(s3, dataset, tmp_path):
    """--masks (and the features cache) on S3, inputs local: the masks of a local run."""
    local = tmp_path / "local"
    ok(cli("cluster-dataset", dataset, "--masks", local / "masks", "--cache", local / "cache", *method_args()))
    ok(cli("cluster-dataset", dataset, "--masks", "s3://bkt/masks", "--cache", "s3://bkt/c2", *method_args()))
    got = objects(s3, "bkt/masks")
    assert json.loads(got.pop("segcli-run.json"))["written"] == len(pngs(local / "masks"))  # the run record
    assert got == {**pngs(local / "masks"), ".segcli-run.json": (local / "masks" / ".segcli-run.json").read_bytes()}


def test_outputs_never_overwrite_inputs_in_a_bucket(s3, dataset):
    s3.put(str(dataset), "bkt/images", recursive=True)
    for option, where in (("--out", "s3://bkt/images"), ("--out", "s3://bkt/images/masks"), ("--cache", "s3a://bkt/images/c"),
                          ("--out", "s3://bkt")):
        extra = [] if option == "--out" else ["--out", "s3://bkt/out"]
        r = cli("segment", "s3://bkt/images", option, where, *extra, *method_args())
        assert r.exit_code == 2, (option, where, r.output)
        assert "segcli never writes among its inputs" in r.output
    r = cli("cluster-dataset", "s3://bkt/images", "--out", "s3://bkt/images/s0.png", *method_args())
    assert r.exit_code == 2 and "never writes among its inputs" in r.output
    assert sorted(storage.list_files(ObjectPath("s3://bkt/images"))) == ["s0.png", "s1.png", "s2.png", "s3.png", "sub/s4.png"]


def one_line_error(r, code: int, *needles: str) -> None:
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert r.exit_code == code, r.output
    assert len(lines) == 1 and lines[0].startswith("segcli: error: "), r.output
    for needle in needles:
        assert needle in lines[0], r.output


def test_missing_buckets_and_credentials_are_one_line(s3, dataset, monkeypatch, tmp_path):
    import s3fs

    s3.put(str(dataset), "bkt/images", recursive=True)
    one_line_error(cli("segment", "s3://no-such-bucket/images", "--out", tmp_path / "o", *method_args()), 3,
                   "s3://no-such-bucket/images", "bucket does not exist")
    one_line_error(cli("segment", "s3://bkt/empty-prefix", "--out", tmp_path / "o", *method_args()), 3,
                   "input folder not found: s3://bkt/empty-prefix")
    one_line_error(cli("segment", dataset, "--out", "s3://no-such-bucket/out", *method_args()), 3,
                   "cannot write to s3://no-such-bucket/out", "bucket does not exist")
    one_line_error(cli("segment", dataset, "--out", tmp_path / "o", "--cache", "s3://no-such-bucket/c",
                       *method_args()), 3, "s3://no-such-bucket/c", "bucket does not exist")
    # written only at the end of a run, checked before any work
    one_line_error(cli("cluster-dataset", dataset, "--out", "s3://no-such-bucket/m.segcli", *method_args()), 3,
                   "cannot write to s3://no-such-bucket", "bucket does not exist")
    one_line_error(cli("segment", dataset, "--out", tmp_path / "o", "--overlay", "s3://no-such-bucket/ov",
                       *method_args()), 3, "cannot write to s3://no-such-bucket/ov", "bucket does not exist")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.png"))
    one_line_error(cli("segment", dataset, "--out", tmp_path / "o", "--model", "s3://bkt/none.segcli",
                       *method_args()), 5, "model file not found: s3://bkt/none.segcli")

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()
    one_line_error(cli("segment", "s3://bkt/images", "--out", tmp_path / "o", *method_args()), 3,
                   "s3://bkt/images", "no credentials found")
    one_line_error(cli("segment", dataset, "--out", "s3://bkt/out", *method_args()), 3,
                   "s3://bkt/out", "no credentials found")


def test_evaluate_reads_predictions_and_ground_truth_from_a_bucket(s3, tmp_path):
    """`segcli evaluate s3://... s3://...` (a VOC layout with --split, process workers) scores as on disk."""
    import json

    rng = np.random.default_rng(3)
    files = {}
    for i, name in enumerate(["2007_000001", "2007_000002", "2007_000003"]):
        gt = rng.integers(0, 3, (12, 16), dtype=np.uint8)
        gt[0, :3] = 255
        files[f"gt/VOC2012/SegmentationClass/{name}.png"] = gt
        files[f"pred/{name}.png"] = np.where(gt == 255, 0, (gt + i) % 3 + 4).astype(np.uint8)
    for rel, arr in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(tmp_path / rel)
        s3.put_file(str(tmp_path / rel), f"bkt/ev/{rel}")
    split = "2007_000001\n2007_000003\n"
    (tmp_path / "gt/VOC2012/ImageSets/Segmentation").mkdir(parents=True)
    (tmp_path / "gt/VOC2012/ImageSets/Segmentation/val.txt").write_text(split)
    s3.pipe_file("bkt/ev/gt/VOC2012/ImageSets/Segmentation/val.txt", split.encode())

    def scores(pred, gt):
        r = ok(cli("evaluate", pred, gt, "--num-classes", "3", "--split", "val", "-j", "2", "--json", "-"))
        out = json.loads(r.output[r.output.index("{"):])
        return {k: v for k, v in out.items() if k not in ("pred_dir", "gt_dir", "seconds")}, out

    local, _ = scores(tmp_path / "pred", tmp_path / "gt")
    remote, raw = scores("s3://bkt/ev/pred", "s3://bkt/ev/gt")
    assert remote == local and raw["gt_dir"] == "s3://bkt/ev/gt/VOC2012/SegmentationClass"
    r = cli("evaluate", "s3://bkt/ev/none", "s3://bkt/ev/gt", "--num-classes", "3")
    one_line_error(r, 3, "prediction folder s3://bkt/ev/none does not exist")


# ------------------------------------------------------------------------------------------------ GCS emulator


@pytest.fixture(scope="module")
def gcs_server():
    """A GCS emulator (gcp-storage-emulator, in memory) on 127.0.0.1, stopped at the end of the module or after
    SERVER_LIMIT_S; skipped when it is not installed (it is not part of any extra)."""
    pytest.importorskip("gcsfs")
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="gbkt")
    server.start()
    watchdog = threading.Timer(SERVER_LIMIT_S, server.stop)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        watchdog.cancel()
        server.stop()


@pytest.mark.slow
def test_segment_on_gs_writes_the_bytes_of_a_local_run(gcs_server, dataset, tmp_path):
    """The same run with inputs, cache and masks in an (emulated, loopback) GCS bucket, in a subprocess
    whose gcsfs talks to the emulator: byte-identical masks; a rerun keeps them."""
    import os

    from gcsfs.core import GCSFileSystem

    env = {**os.environ, "STORAGE_EMULATOR_HOST": gcs_server, "FSSPEC_GS_TOKEN": "anon", "FSSPEC_GS_PROJECT": "test",
           # gcsfs's experimental bucket-type probe speaks gRPC, which the emulator does not
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_PROXY": "127.0.0.1,localhost"}
    fs = GCSFileSystem(token="anon", project="test", endpoint_url=gcs_server, skip_instance_cache=True)
    fs.put(str(dataset), "gbkt/images", recursive=True)
    local = tmp_path / "local"
    ok(cli("segment", dataset, "--out", local / "out", "--cache", local / "cache", *method_args()))

    def segcli(*args):
        return subprocess.run([sys.executable, "-m", "segcli", *map(str, args)], env=env, capture_output=True,
                              text=True, cwd=Path(__file__).parents[1], timeout=600)

    args = ["segment", "gs://gbkt/images", "--out", "gs://gbkt/out", "--cache", "gs://gbkt/cache", *method_args()]
    r = segcli(*args)
    assert r.returncode == 0 and "wrote 5 masks" in r.stderr, r.stderr
    fs.invalidate_cache()
    got = {n[len("gbkt/out/"):]: fs.cat_file(n) for n in fs.find("gbkt/out") if n.endswith(".png")}
    assert got == pngs(local / "out")
    r = segcli(*args)
    assert r.returncode == 0 and "5 kept" in r.stderr, r.stderr
    r = segcli("segment", "gs://no-such-bucket/images", "--out", tmp_path / "o", *method_args())
    assert r.returncode == 3 and r.stderr.strip() == ("segcli: error: cannot list gs://no-such-bucket/images: "
                                                      "the bucket does not exist"), r.stderr


@pytest.mark.slow
def test_features_folder_in_a_bucket(s3, tmp_path):
    """--features s3://... (bring-your-own features, no backend) gives the masks of the same folder on disk."""
    from tests.synthetic import make_dataset

    make_dataset(tmp_path, n_images=6)
    s3.put(str(tmp_path / "features"), "bkt/features", recursive=True)
    common = ["--k", "4", "--assign", "pooled", "--quiet"]
    ok(cli("segment", tmp_path / "images", "--features", tmp_path / "features", "--out", tmp_path / "out",
           "--cache", tmp_path / "cache", *common))
    ok(cli("segment", tmp_path / "images", "--features", "s3://bkt/features", "--out", tmp_path / "out2",
           "--cache", tmp_path / "cache2", *common))
    assert pngs(tmp_path / "out2") == pngs(tmp_path / "out") and len(pngs(tmp_path / "out")) == 6
    one_line_error(cli("segment", tmp_path / "images", "--features", "s3://bkt/nothing", "--out", tmp_path / "o3",
                       *common), 2, "features folder not found: s3://bkt/nothing")


# ------------------------------------------------------------------------------------------------ issue 20 (round 3)


def test_keys_that_are_not_names_are_reported_before_any_work(s3, tmp_path):
    """Object keys with an empty, '.' or '..' part cannot be mapped to an output name: one line naming them,
    exit 3, before any read (d//e.png used to read d/e.png; ./f.png was silently dropped)."""
    png = _png_bytes()
    for key in ("p/d/e.png", "p/d//e.png", "p/./f.png", "p/ok.png"):
        s3.pipe_file(f"bkt/{key}", png)
    listed = sorted(n[len("bkt/p/"):] for n in s3.find("bkt/p"))
    if "d//e.png" not in listed:
        pytest.skip(f"this S3 server normalises keys: {listed}")
    r = cli("segment", "s3://bkt/p", "--out", tmp_path / "o", "--features", tmp_path / "nofeat", "--k", 3,
            "--assign", "pooled", "--cache", tmp_path / "c", "--quiet")
    assert r.exit_code == 3, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "cannot be mapped to an output name" in lines[0] and "d//e.png" in lines[0], r.output
    assert not (tmp_path / "o").exists()
    # in a list file: the line is refused by number, never read as another object
    lst = tmp_path / "list.txt"
    lst.write_text("s3://bkt/p/ok.png\ns3://bkt/p/d//e.png\n")
    r = cli("segment", lst, "--out", tmp_path / "o", "--features", tmp_path / "nofeat", "--k", 3, "--quiet")
    assert r.exit_code == 3 and "list.txt:2" in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_non_image_object_is_skipped_without_a_download(s3, tmp_path, monkeypatch):
    """A large object that is no image is skipped after a 16-byte ranged read: never downloaded whole."""
    from segcli.engines.feature_source import FeatureSource  # noqa: F401  (imported before the spy)
    from segcli.io.images import image_digest

    s3.pipe_file("bkt/big/video.png", b"\x00\x00\x00\x18ftypmp42" + bytes(4 << 20))
    whole = []
    monkeypatch.setattr(storage, "read_bytes", lambda path, *a, **k: whole.append(path) or b"")
    with pytest.raises(BadImageError, match="not an image"):
        image_digest(ObjectPath("s3://bkt/big/video.png"))
    assert whole == []


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
