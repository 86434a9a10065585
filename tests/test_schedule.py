"""The feature stage's schedule (README "Keeping an accelerator busy"): decode workers ahead of the device,
shape buckets over a lookahead window, results in input order and independent of the schedule, byte for byte."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli.config import SegmentConfig
from segcli.errors import BadImageError
from segcli.engines.feature_source import FeatureSource
from segcli.io.images import ImageItem
from tests.checkpoints import TINY, random_backbone

# Three backbone input shapes at short side 224 (patch 16): 224x336, 336x224 and 224x224 (realistic token counts:
# torch's CPU matmul kernels are batch-invariant there, not for a handful of tokens; see the README).
SIZES = [(60, 40), (40, 60), (50, 50)]


@pytest.fixture(scope="module")
def backbone():
    return random_backbone(TINY)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[ImageItem]:
    """14 images whose sizes alternate, so neighbours never share a shape, and one unreadable file."""
    root = tmp_path_factory.mktemp("schedule")
    rng = np.random.default_rng(0)
    items = []
    for i in range(14):
        w, h = SIZES[i % 3]
        path = root / f"im{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        items.append(ImageItem(key=f"im{i:02d}", path=path))
    bad = root / "bad.png"
    bad.write_bytes(b"not an image")
    items.insert(5, ImageItem(key="bad", path=bad))
    return items


def run(backbone, items, tmp_path: Path, name: str, **kw):
    config = SegmentConfig(backbone=TINY, short_side=224, max_side=448)
    src = FeatureSource(config, backbone=backbone, cache_dir=tmp_path / name, **kw)
    out = list(src.features(items))
    return src, out


def arrays(f) -> bytes:
    return b"".join(np.ascontiguousarray(a).tobytes() for a in (f.feats, f.cls, f.attn, f.proposal))


def test_order_and_bytes_do_not_depend_on_the_schedule(backbone, images, tmp_path):
    reference = None
    for name, kw in {
        "inline-b1": dict(batch_size=1, decode_workers=0),
        "inline-b4": dict(batch_size=4, decode_workers=0),
        "threads-b3": dict(batch_size=3, decode_workers=2),
        "threads-b8-small-window": dict(batch_size=8, decode_workers=3, lookahead=5),
    }.items():
        src, out = run(backbone, images, tmp_path, name, **kw)
        assert [item.key for item, _ in out] == [item.key for item in images], name
        assert isinstance(dict((i.key, f) for i, f in out)["bad"], BadImageError)
        got = {item.key: arrays(f) for item, f in out if not isinstance(f, BadImageError)}
        if reference is None:
            reference = got
        assert got == reference, f"{name}: features differ from the batch-1 in-process run"
        # and the cache entries written by the workers are the same features
        again = FeatureSource(src.config, backbone=backbone, cache_dir=tmp_path / name, decode_workers=0)
        cached = {i.key: arrays(f) for i, f in again.features(images) if not isinstance(f, BadImageError)}
        assert cached == reference, name
        assert again.last_batch_sizes == [], "everything came from the cache"


def test_batches_are_full_across_the_input(backbone, images, tmp_path):
    # 14 readable images of three shapes (5, 5, 4): with a window over the whole input, batches of 4 are
    # full except one remainder per shape. Neighbour-only grouping would give batches of one.
    src, _ = run(backbone, images, tmp_path, "full", batch_size=4, decode_workers=2, lookahead=64)
    assert sorted(src.last_batch_sizes, reverse=True) == [4, 4, 4, 1, 1]
    # a window of 4 images bounds what is held: never a batch larger than the window allows
    src, out = run(backbone, images, tmp_path, "bounded", batch_size=4, decode_workers=0, lookahead=4)
    assert sum(src.last_batch_sizes) == 14 and max(src.last_batch_sizes) <= 2


def test_stopping_early_stops_the_workers(backbone, images, tmp_path):
    before = {t.ident for t in threading.enumerate()}
    config = SegmentConfig(backbone=TINY, short_side=224, max_side=448)
    src = FeatureSource(config, backbone=backbone, cache_dir=tmp_path / "stop", batch_size=2, decode_workers=3)
    gen = src.features(images)
    next(gen)
    gen.close()  # what a KeyboardInterrupt in the consumer does to the generator
    left = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("segcli-decode")]
    assert left == []
    # what was finished is in the cache; the rest is computed by the next pass
    src2, out = run(backbone, images, tmp_path, "stop", batch_size=2, decode_workers=0)
    assert len(out) == len(images) and sum(src2.last_batch_sizes) < 14


def test_precision_auto_resolves_from_the_hardware(monkeypatch):
    import torch

    import segcli.vit.backbone as bb
    from segcli.errors import UsageError

    amx = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_tile amx_bf16\n"
    avx = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
    plain = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
    assert bb.cpu_has_native_bf16(amx) and bb.cpu_has_native_bf16(avx) and not bb.cpu_has_native_bf16(plain)
    cpu = torch.device("cpu")
    monkeypatch.setattr(bb, "cpu_has_native_bf16", lambda: True)
    assert bb.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(bb, "cpu_has_native_bf16", lambda: False)
    assert bb.resolve_precision("auto", cpu) == "fp32"
    assert bb.resolve_precision("AUTO", torch.device("mps")) == "fp32"
    assert bb.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(UsageError):
        bb.resolve_precision("fp16", cpu)


def test_the_cache_key_holds_the_resolved_precision(tmp_path, monkeypatch):
    import segcli.vit.backbone as bb
    from tests.checkpoints import checkpoint_file

    config = SegmentConfig(backbone=TINY, short_side=32, max_side=64)
    keys = {}
    for native in (True, False):
        monkeypatch.setattr(bb, "cpu_has_native_bf16", lambda native=native: native)
        src = FeatureSource(config, weights=checkpoint_file(TINY, "timm"), device="cpu", precision="auto",
                            cache_dir=tmp_path)
        keys[native] = (src.backbone.precision, src.cache.root)
    assert keys[True][0] == "bf16" and keys[False][0] == "fp32"
    assert keys[True][1] != keys[False][1]


@pytest.mark.slow
@pytest.mark.skipif(not any(__import__("shutil").which(c) for c in ("cc", "gcc", "clang")),
                    reason="torch.compile's CPU backend needs a C compiler")
def test_compile_gives_the_eager_features_cached_apart(images, tmp_path, monkeypatch):
    from tests.checkpoints import checkpoint_file

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # compile() sets the variable: undone after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    config = SegmentConfig(backbone=TINY, short_side=32, max_side=64)
    kw = dict(weights=checkpoint_file(TINY, "timm"), device="cpu", precision="fp32", cache_dir=tmp_path,
              batch_size=4, decode_workers=1)
    eager = FeatureSource(config, **kw)
    compiled = FeatureSource(config, compile=True, **kw)
    assert compiled.backbone.compiled and compiled.cache.root != eager.cache.root
    ref = {i.key: f for i, f in eager.features(images[:4])}
    got = {i.key: f for i, f in compiled.features(images[:4])}
    assert [*got] == [*ref]
    for key, f in ref.items():
        a, b = f.feats.astype(np.float32).ravel(), got[key].feats.astype(np.float32).ravel()
        assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.9999
        np.testing.assert_allclose(got[key].cls, f.cls, rtol=1e-3, atol=1e-3)
    assert (tmp_path / "inductor").is_dir()  # the on-disk kernel cache lives under the --cache folder


@pytest.mark.slow
def test_same_masks_and_model_for_any_batch_size_and_workers(tmp_path):
    """Item 6: the model file and every mask are byte-identical whatever --batch-size, --decode-workers and
    --workers (0: in-process; 1, 2: worker processes for the fit passes and the masks; each run has its own
    cache, so every feature and region bundle is computed under that schedule)."""
    from typer.testing import CliRunner

    from segcli.cli import app
    from segcli.method.model import SegModel
    from tests.checkpoints import checkpoint_file
    from tests.test_cli_backbone import scene

    images = tmp_path / "images"
    images.mkdir()
    for i in range(9):
        scene(*SIZES[i % 3], seed=200 + i).save(images / f"s{i}.png")
    runner = CliRunner()
    outputs = {}
    for name, extra in {"serial": ["--batch-size", "1", "--decode-workers", "0", "--workers", "0"],
                        "batched": ["--batch-size", "4", "--decode-workers", "2", "--workers", "0"],
                        "pool1": ["--batch-size", "3", "--decode-workers", "0", "--workers", "1"],
                        "pool2": ["--batch-size", "4", "--decode-workers", "2", "--workers", "2"]}.items():
        args = ["cluster-dataset", images, "--out", tmp_path / f"{name}.segcli", "--masks", tmp_path / name,
                "--weights", checkpoint_file(TINY, "timm"), "--cache", tmp_path / f"cache-{name}", "--k", "3",
                "--short-side", "224", "--max-side", "448", "--crf-max-side", "64", "--device", "cpu",
                "--precision", "fp32", "--fusion", "any", "--regions", "whole", "--quiet", *extra]
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        outputs[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("*.png"))}
        # safetensors orders its JSON header at random: the model's identity is its arrays and sorted metadata
        model = SegModel.load(tmp_path / f"{name}.segcli")
        outputs[name]["model"] = (model.digest(), {k: v.tobytes() for k, v in model.tensors().items()})
    assert len(outputs["serial"]) == 10
    assert outputs["batched"] == outputs["serial"]
    assert outputs["pool1"] == outputs["serial"], "--workers 1 changed masks or model"
    assert outputs["pool2"] == outputs["serial"], "--workers 2 changed masks or model"


@pytest.mark.slow
def test_ctrl_c_stops_the_decode_workers_and_the_run_resumes(tmp_path):
    """Ctrl-C while decode workers run ahead: exit 130 within seconds, then the same command finishes, keeping
    every feature file written before the interrupt."""
    import subprocess
    import sys

    from tests.checkpoints import checkpoint_file
    from tests.processes import ROOT, interrupt, segcli_process, wait_until
    from tests.test_cli_backbone import feature_files, scene

    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):
        scene(*SIZES[i % 3], seed=300 + i).save(images / f"s{i:02d}.png")
    cache = tmp_path / "cache"
    args = ["cluster-dataset", images, "--shard", "1/1", "--weights", checkpoint_file(TINY, "timm"), "--cache", cache,
            "--short-side", "224", "--max-side", "448", "--batch-size", "2", "--decode-workers", "2",
            "--device", "cpu", "--quiet"]
    with segcli_process(args) as proc:
        wait_until(proc, lambda: len(feature_files(cache)) >= 2, "feature files", 150)
        code, err, seconds = interrupt(proc)
    assert seconds < 10
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    before = {p: p.stat().st_mtime_ns for p in feature_files(cache)}
    rerun = subprocess.run([sys.executable, "-m", "segcli", *map(str, args)], cwd=ROOT, capture_output=True)
    assert rerun.returncode == 0, rerun.stderr
    assert len(feature_files(cache)) == 40
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in before.items()), "finished features were redone"


@pytest.mark.slow
def test_region_crops_of_many_images_share_a_crop_forward(tmp_path, monkeypatch):
    """Item 5: the region pass gathers the crops of consecutive images into one crop forward (bounded by
    CROP_GROUP_*), and masks and model are byte-identical to embedding one image's crops at a time."""
    from typer.testing import CliRunner

    import segcli.pipeline as pipeline
    import segcli.method.steps as steps
    from segcli.vit.backbone import Backbone
    from segcli.cli import app
    from segcli.method.model import SegModel
    from tests.checkpoints import checkpoint_file
    from tests.test_cli_backbone import scene

    def three_stripes(fg, *args, **kwargs):  # every image gets 3 regions of different widths
        fg = np.asarray(fg)
        cols = np.searchsorted([fg.shape[1] // 5, fg.shape[1] // 2], np.arange(fg.shape[1]), side="right") + 1
        return np.broadcast_to(cols, fg.shape).astype(np.int32), 3

    calls: list[int] = []
    embed = Backbone.embed_crops

    def counting_embed(self, crops, *args, **kwargs):
        calls.append(len(crops))
        return embed(self, crops, *args, **kwargs)

    monkeypatch.setattr(steps, "find_regions", three_stripes)
    monkeypatch.setattr(Backbone, "embed_crops", counting_embed)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(9):
        scene(*SIZES[i % 3], seed=300 + i).save(images / f"s{i}.png")
    runner = CliRunner()
    outputs, crop_calls = {}, {}
    bounds = {"alone": (1, 16), "groups": (8, 16), "pairs": (64, 2),
              "default": (pipeline.CROP_GROUP_CROPS, pipeline.CROP_GROUP_IMAGES)}
    for name, (group_crops, group_images) in bounds.items():
        monkeypatch.setattr(pipeline, "CROP_GROUP_CROPS", group_crops)
        monkeypatch.setattr(pipeline, "CROP_GROUP_IMAGES", group_images)
        calls.clear()
        args = ["cluster-dataset", images, "--out", tmp_path / f"{name}.segcli", "--masks", tmp_path / name,
                "--weights", checkpoint_file(TINY, "timm"), "--cache", tmp_path / f"cache-{name}", "--k", "3",
                "--short-side", "224", "--max-side", "448", "--crf-max-side", "64", "--device", "cpu",
                "--precision", "fp32", "--workers", "0", "--quiet"]  # in-process: the spies live in this process
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        crop_calls[name] = list(calls)
        outputs[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("*.png"))}
        model = SegModel.load(tmp_path / f"{name}.segcli")
        outputs[name]["model"] = (model.digest(), {k: v.tobytes() for k, v in model.tensors().items()})
    # Region bundles are computed once (the masks pass reads them from the cache).
    assert crop_calls == {"alone": [3] * 9, "groups": [9, 9, 9], "pairs": [6, 6, 6, 6, 3], "default": [27]}
    assert len(outputs["alone"]) == 10
    assert outputs["groups"] == outputs["alone"]
    assert outputs["pairs"] == outputs["alone"]
    assert outputs["default"] == outputs["alone"]
