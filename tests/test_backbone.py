"""Backbone names, devices, weights loading (every layout, every failure) and input preparation."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from segcli.vit.backbone import (
    ALIASES,
    DEFAULT_BACKBONE,
    Backbone,
    load_backbone,
    resolve_backbone_name,
    select_device,
    target_size,
)
from segcli.vit.compat import import_timm
from segcli.errors import ModelError, UsageError
from tests.checkpoints import LAYOUTS, SMALL, TINY, checkpoint_file, random_backbone, random_state_dict, save_checkpoint

REG = "vit_small_patch14_reg4_dinov2.lvd142m"
V2 = "vit_small_patch14_dinov2.lvd142m"


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def assert_same_params(bb: Backbone, expected: dict[str, torch.Tensor], close: tuple[str, ...] = ()) -> None:
    got = bb.model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        if k in close:
            torch.testing.assert_close(got[k].cpu(), v, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got[k].cpu(), v), k


# ----------------------------------------------------------------------------------------- names


def test_compat_import_timm_is_idempotent():
    assert import_timm() is import_timm()


def test_aliases_are_pretrained_timm_models():
    timm = import_timm()
    pretrained = set(timm.list_models(pretrained=True))
    assert DEFAULT_BACKBONE in pretrained
    assert set(ALIASES) == {"dino-s16", "dino-s8", "dino-b16", "dino-b8", "dinov2-s14", "dinov2-s14-reg"}
    for alias, name in ALIASES.items():
        assert name in pretrained, alias
        assert resolve_backbone_name(alias) == name
    assert ALIASES["dino-s16"] == DEFAULT_BACKBONE


def test_resolve_backbone_name_accepts_timm_vits_and_canonicalises():
    assert resolve_backbone_name("DINO-S16") == DEFAULT_BACKBONE
    assert resolve_backbone_name(DEFAULT_BACKBONE) == DEFAULT_BACKBONE
    assert resolve_backbone_name("vit_small_patch14_dinov2") == V2
    assert resolve_backbone_name("vit_tiny_patch16_224").startswith("vit_tiny_patch16_224.")


@pytest.mark.parametrize("name", ["resnet50", "no_such_model", "", "vit_small_patch16_224.nope"])
def test_unknown_backbone_is_a_model_error(name):
    with pytest.raises(ModelError) as err:
        resolve_backbone_name(name)
    msg = one_line(err)
    assert "dino-s16" in msg
    with pytest.raises(ModelError):
        load_backbone(name, weights="unused.pth", device="cpu")


# --------------------------------------------------------------------------------------- devices


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(UsageError) as err:
        select_device("tpu")
    one_line(err)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError) as err:
            select_device("cuda")
        assert "--device cpu" in one_line(err)


def test_precision_checks():
    path = checkpoint_file(TINY, "timm")
    with pytest.raises(UsageError):
        load_backbone(TINY, weights=path, device="cpu", precision="fp8")
    with pytest.raises(UsageError) as err:
        load_backbone(TINY, weights=path, device="cpu", precision="fp16")
    assert "bf16" in one_line(err)


def test_bf16_on_cpu_is_close_to_fp32():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    fp32 = random_backbone(TINY)
    bf16 = load_backbone(TINY, weights=checkpoint_file(TINY, "timm"), device="cpu", precision="bf16")
    a = fp32.extract_image(rgb, short_side=64)
    b = bf16.extract_image(rgb, short_side=64)
    assert b.feats.dtype == torch.float32 and b.feats.shape == a.feats.shape
    assert (a.feats * b.feats).sum(-1).mean() > 0.98


# ---------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_identical_parameters(tmp_path, layout):
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    expected = save_checkpoint(path, layout, name=TINY, seed=3)
    bb = load_backbone(TINY, weights=path, device="cpu")
    assert_same_params(bb, expected)
    assert bb.weights_id.startswith("sha256:")
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert not bb.model.training


def test_teacher_wins_over_student_in_one_dict(tmp_path):
    """DINOv2-style training checkpoints keep both networks in one dict: {'model': {'student.backbone.*',
    'teacher.backbone.*', heads}}; the teacher is the released one."""
    sd = random_state_dict(TINY, seed=6)
    both = {}
    for k, v in sd.items():
        both[f"student.backbone.{k}"] = v + 1.0
        both[f"teacher.backbone.{k}"] = v
    both["teacher.dino_head.mlp.0.weight"] = torch.zeros(8, 192)
    path = tmp_path / "train.pth"
    torch.save({"model": both, "iteration": 10}, path)
    assert_same_params(load_backbone(TINY, weights=path, device="cpu"), sd)


def test_safetensors_content_with_pth_suffix_is_recognised(tmp_path):
    src = tmp_path / "w.safetensors"
    expected = save_checkpoint(src, "safetensors", name=TINY, seed=4)
    renamed = tmp_path / "w.bin"
    src.rename(renamed)
    assert_same_params(load_backbone(TINY, weights=renamed, device="cpu"), expected)


def test_official_dinov2_with_registers_loads_and_registers_leave_the_grid(tmp_path):
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    expected = save_checkpoint(path, "dino", name=REG, seed=1)
    keys = set(torch.load(path, weights_only=True))
    assert {"register_tokens", "mask_token", "blocks.0.ls1.gamma"} <= keys  # official DINOv2 naming
    bb = load_backbone("dinov2-s14-reg", weights=path, device="cpu")
    assert_same_params(bb, expected, close=("cls_token",))
    assert bb.patch_size == 14 and bb.num_prefix_tokens == 5 and bb.embed_dim == 384
    rgb = np.zeros((100, 150, 3), np.uint8)
    x = bb.prepare(rgb, short_side=70)
    assert tuple(x.shape) == (3, 70, 112)  # 150 * 0.7 = 105 -> 7.5 patches -> 8
    fb = bb.extract(x[None])
    assert fb.feats.shape == (1, 5, 8, 384) and fb.attn.shape == (1, 5, 8) and fb.cls.shape == (1, 384)


def test_official_dinov2_without_registers_loads(tmp_path):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    expected = save_checkpoint(path, "dino", name=V2, seed=2)
    bb = load_backbone("dinov2-s14", weights=path, device="cpu")
    assert_same_params(bb, expected)
    assert bb.num_prefix_tokens == 1


def test_official_dino_layout_for_default_backbone(tmp_path):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    expected = save_checkpoint(path, "dino", name=SMALL, seed=5)
    bb = load_backbone("dino-s16", weights=path, device="cpu")
    assert_same_params(bb, expected)
    assert (bb.patch_size, bb.embed_dim, bb.num_prefix_tokens) == (16, 384, 1)
    assert bb.mean == pytest.approx((0.485, 0.456, 0.406)) and bb.std == pytest.approx((0.229, 0.224, 0.225))


def test_wrong_architecture_is_a_model_error(tmp_path):
    tiny = checkpoint_file(TINY, "timm")
    with pytest.raises(ModelError) as err:
        load_backbone(SMALL, weights=tiny, device="cpu")
    msg = one_line(err)
    assert str(tiny) in msg and "does not fit" in msg and "shape" in msg

    s8 = tmp_path / "s8.pth"
    save_checkpoint(s8, "dino", name="vit_small_patch8_224.dino")
    with pytest.raises(ModelError) as err:
        load_backbone("dino-s16", weights=s8, device="cpu")
    assert "has patch size 8" in one_line(err)

    reg = tmp_path / "reg.pth"
    save_checkpoint(reg, "dino", name=REG)
    with pytest.raises(ModelError) as err:
        load_backbone("dinov2-s14", weights=reg, device="cpu")
    assert "4 register tokens" in one_line(err)
    v2 = tmp_path / "v2.pth"
    save_checkpoint(v2, "dino", name=V2)
    with pytest.raises(ModelError) as err:
        load_backbone("dinov2-s14-reg", weights=v2, device="cpu")
    assert "no register tokens" in one_line(err)

    partial = tmp_path / "partial.pth"
    sd = random_state_dict(TINY)
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.11.")}, partial)
    with pytest.raises(ModelError) as err:
        load_backbone(TINY, weights=partial, device="cpu")
    assert "missing keys, e.g. blocks.11." in one_line(err)


def _corrupt_files(tmp: Path) -> dict[str, Path]:
    good = checkpoint_file(TINY, "timm").read_bytes()
    good_st = checkpoint_file(TINY, "safetensors").read_bytes()
    files = {
        "truncated zip": good[: len(good) // 2],
        "random bytes": os.urandom(4096),
        "empty": b"",
        "text": b"this is not a checkpoint\n",
        "truncated safetensors": good_st[: len(good_st) // 3],
    }
    out = {}
    for i, (label, data) in enumerate(files.items()):
        p = tmp / f"bad{i}{'.safetensors' if 'safetensors' in label else '.pth'}"
        p.write_bytes(data)
        out[label] = p
    legacy = tmp / "legacy.pth"
    torch.save({"a": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    b = legacy.read_bytes()
    legacy.write_bytes(b[: len(b) // 2])
    out["truncated legacy pickle"] = legacy
    not_dict = tmp / "tensor.pth"
    torch.save(torch.zeros(3), not_dict)
    out["a bare tensor"] = not_dict
    resnet = tmp / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, resnet)
    out["not a ViT"] = resnet
    out["missing"] = tmp / "does-not-exist.pth"
    out["directory"] = tmp
    return out


def test_unusable_weights_files_are_one_line_model_errors(tmp_path):
    for label, path in _corrupt_files(tmp_path).items():
        with pytest.raises(ModelError) as err:
            load_backbone(TINY, weights=path, device="cpu")
        msg = one_line(err)
        assert str(path) in msg, (label, msg)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    with pytest.raises(ModelError) as err:
        load_backbone(TINY, weights=path, device="cpu")
    msg = one_line(err)
    assert "weights_only" in msg and "system" in msg
    assert not marker.exists()


# ------------------------------------------------------------------------------- pretrained (hub)


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return cache


def test_offline_pretrained_fails_fast_with_instructions(empty_hf_cache, monkeypatch):
    import segcli.vit.backbone as backbone_mod

    monkeypatch.setattr(backbone_mod, "_hub_reachable", lambda timeout=5.0: False)
    t0 = time.monotonic()
    with pytest.raises(ModelError) as err:
        load_backbone("dino-s16", device="cpu")
    msg = one_line(err)
    assert "offline?" in msg and "--weights" in msg and "weights/README.md" in msg and DEFAULT_BACKBONE in msg
    assert time.monotonic() - t0 < 10


def test_unreachable_hub_fails_fast_without_retries(empty_hf_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    t0 = time.monotonic()
    with pytest.raises(ModelError) as err:
        load_backbone(TINY, device="cpu")
    assert "offline?" in one_line(err)
    assert time.monotonic() - t0 < 10  # huggingface_hub alone would retry for ~45 s


def test_hf_hub_offline_env_is_respected(empty_hf_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as err:
        load_backbone("dino-s16", device="cpu")
    assert "HF_HUB_OFFLINE" in one_line(err)


def test_pretrained_weights_come_from_the_cache_without_network(empty_hf_cache, monkeypatch):
    import segcli.vit.backbone as backbone_mod
    from safetensors.torch import save_file

    def no_network(timeout=5.0):  # the cached copy must be found before any request
        raise AssertionError("network probe on a cache hit")

    monkeypatch.setattr(backbone_mod, "_hub_reachable", no_network)
    snap = empty_hf_cache / "models--timm--vit_small_patch16_224.dino" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    sd = random_state_dict(SMALL, seed=7)
    save_file(sd, str(snap / "model.safetensors"))
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    bb = load_backbone("dino-s16", device="cpu")
    assert bb.weights_id == "timm-pretrained:timm/vit_small_patch16_224.dino"
    assert_same_params(bb, sd)


# ------------------------------------------------------------------------------------ fingerprint


def test_fingerprint_depends_on_weights(tmp_path):
    a = random_backbone(TINY, seed=0)
    again = load_backbone(TINY, weights=checkpoint_file(TINY, "timm", 0), device="cpu")
    other = load_backbone(TINY, weights=checkpoint_file(TINY, "timm", 1), device="cpu")
    assert a.fingerprint() == again.fingerprint()
    assert a.fingerprint() != other.fingerprint()
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0
    # same weights in another file format: different file bytes, so a different identity
    st = load_backbone(TINY, weights=checkpoint_file(TINY, "safetensors", 0), device="cpu")
    assert st.fingerprint() != a.fingerprint()


# ------------------------------------------------------------------------------------------ input


@pytest.mark.parametrize(
    "hw, short, max_side, expect",
    [
        ((300, 400), 112, 1344, (112, 144)),  # 149.3 -> 9 patches
        ((400, 300), 112, 1344, (144, 112)),
        ((20, 30), 64, 1344, (64, 96)),  # upscaling
        ((1000, 2000), 448, 1344, (448, 896)),  # downscaling
        ((100, 1000), 112, 448, (48, 448)),  # long side capped, short side follows
        ((1, 1), 64, 1344, (64, 64)),
        ((1, 5000), 448, 1344, (16, 1344)),  # at least one patch
        ((50, 1000), 64, 100, (16, 96)),  # cap not a multiple of the patch: floor to one
        ((200, 3000), 448, None, (448, 6720)),  # no cap
    ],
)
def test_target_size(hw, short, max_side, expect):
    assert target_size(*hw, patch=16, short_side=short, max_side=max_side) == expect


def test_prepare_resizes_and_normalises():
    bb = random_backbone(SMALL)
    rgb = np.full((30, 45, 3), 200, np.uint8)
    x = bb.prepare(rgb, short_side=64)
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 64, 96)
    for c in range(3):
        torch.testing.assert_close(x[c], torch.full((64, 96), (200 / 255 - bb.mean[c]) / bb.std[c]), atol=1e-5, rtol=0)
    tiny = bb.prepare(np.zeros((1, 1, 3), np.uint8), short_side=64, max_side=None)
    assert tuple(tiny.shape) == (3, 64, 64)
    big = bb.prepare(np.zeros((10, 400, 3), np.uint8), short_side=112, max_side=160)
    assert tuple(big.shape) == (3, 16, 160)
    # grey and RGBA arrays are accepted, other dtypes are a caller bug
    assert tuple(bb.prepare(np.zeros((32, 32), np.uint8), short_side=32).shape) == (3, 32, 32)
    assert tuple(bb.prepare(np.zeros((32, 32, 4), np.uint8), short_side=32).shape) == (3, 32, 32)
    with pytest.raises(ValueError):
        bb.prepare(np.zeros((32, 32, 3), np.float32))


def test_prepare_keeps_aspect_ratio_within_a_patch():
    bb = random_backbone(SMALL)
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(5, 900, 2))
        short = int(rng.integers(32, 500))
        H, W = bb.input_size(h, w, short_side=short, max_side=None)
        assert H % 16 == 0 and W % 16 == 0 and H >= 16 and W >= 16
        s = short / min(h, w)
        assert abs(H - h * s) <= 8 or H == 16
        assert abs(W - w * s) <= 8 or W == 16
