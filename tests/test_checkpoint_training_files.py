"""Checkpoints as the upstream *training* code writes them (issue 19), and hostile checkpoints (issue 20 items 2,
7, 10, 12): numpy scalars under pickle protocol 2, sacred read-only containers, Python 2 names, DINO's
teacher/student, DINOv3 plus / 7B layouts, Orbax directories, DINO's and DINOv2's position resize; memory bombs, FIFOs,
deep msgpack nesting and non-float weights are refused with exit 5 and one line naming the file."""

from __future__ import annotations

import collections
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from segcli.vit.checkpoints import open_checkpoint, read_checkpoint
from segcli.vit.checkpoints.safe_pickle import RefusedGlobal, load_zip_checkpoint
from segcli.vit.checkpoints.vit import fit_state_dict
from segcli.errors import ModelError
from tests.checkpoints import TINY, random_state_dict, save_checkpoint
from tests.cli_helpers import cli, ok
from tests.seed_checkpoints import Evil, _SACRED, fake_modules, ReadOnlyList, save_leopart, save_loca

FAST = ["--device", "cpu", "--quiet", "--crf-max-side", 64, "--work-max-side", 256, "--fusion", "any", "--regions", "whole"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(d / "a.png")
    return d


def pickle_globals(path: Path) -> set[str]:
    import pickletools

    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    return {str(arg).replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


# ------------------------------------------------------------------ training files, as written upstream


def test_dino_training_checkpoint_with_numpy_scalars(tmp_path):
    path = tmp_path / "checkpoint.pth"
    sd = save_checkpoint(path, "dino-train", name=TINY)
    names = pickle_globals(path)
    assert "_codecs.encode" in names and any(n.endswith("multiarray.scalar") for n in names)  # what DINO's file holds
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # torch's safe loader refuses it: segcli's unpickler reads it
    raw = read_checkpoint(path)
    groups = raw["optimizer"]["param_groups"]
    assert float(groups[0]["weight_decay"]) == pytest.approx(np.linspace(0.04, 0.4, 10)[3])
    assert isinstance(groups[0]["lr"], np.float64)
    ck = open_checkpoint(path)
    assert ck.system == "dino" and ck.arch == TINY
    assert all(torch.equal(ck.state_dict[k], v) for k, v in sd.items())  # the teacher, not module.* (student)


def test_leopart_lightning_with_sacred_containers_and_numpy(tmp_path):
    path = tmp_path / "leopart-train.ckpt"
    sd = save_leopart(path, wrapped=True, teacher=True, name=TINY)
    names = pickle_globals(path)
    assert {"sacred.config.custom_containers.ReadOnlyList", "_codecs.encode"} <= names
    raw = read_checkpoint(path)
    assert raw["hyper_parameters"]["crops_scale"] == [[0.25, 1.0], [0.05, 0.25]]
    assert raw["hyper_parameters"]["optimizer"]["name"] == "adamw"
    ck = open_checkpoint(path)
    assert ck.system == "leopart" and ck.pos_interp == "dino"
    assert all(torch.equal(ck.state_dict[k], v) for k, v in sd.items())
    assert "sacred" not in sys.modules


def test_protocol2_python2_names(tmp_path):
    """torch.save (protocol 2) names int as __builtin__.long; the standard mapping applies, then the checks."""
    path = tmp_path / "hp.ckpt"
    sd = random_state_dict(TINY)
    torch.save({"state_dict": sd, "hyper_parameters": {"counts": collections.defaultdict(int, a=3), "big": 2**70,
                                                       "text": "caf\u00e9", "raw": b"\x00\xff"}}, path)
    assert "__builtin__.long" in pickle_globals(path)
    raw = read_checkpoint(path)
    hp = raw["hyper_parameters"]
    assert hp["big"] == 2**70 and hp["text"] == "caf\u00e9" and hp["raw"] == b"\x00\xff" and hp["counts"]["a"] == 3
    assert open_checkpoint(path).arch == TINY


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _malicious_objects():
    import _codecs

    from numpy._core import multiarray

    return {
        "codecs-rot13": _Reduce(_codecs.encode, ("payload", "rot13")),
        "codecs-bytes-zlib": _Reduce(_codecs.encode, (b"payload", "zlib_codec")),
        "codecs-latin1-of-object": _Reduce(_codecs.encode, (Evil(Path("/nonexistent/x")), "latin1")),
        "numpy-object-dtype": _Reduce(np.dtype, ("O", False, True)),
        "numpy-structured-dtype": _Reduce(np.dtype, ("V1048576", False, True)),
        "numpy-scalar-of-str": _Reduce(multiarray.scalar, ("f8", b"\x00" * 8)),
        "bytes-of-length": _Reduce(bytes, (2**40,)),
        "bytearray-of-length": _Reduce(bytearray, (2**40,)),
        "python2-eval": _Reduce(eval, ("1",)),
    }


@pytest.mark.parametrize("case", sorted(_malicious_objects()))
def test_each_new_allowance_refuses_malicious_use(tmp_path, case):
    path = tmp_path / "evil.ckpt"
    obj = _malicious_objects()[case]
    torch.save({"state_dict": random_state_dict(TINY), "x": obj}, path)
    with pytest.raises(RefusedGlobal):
        load_zip_checkpoint(path)  # segcli's unpickler itself (torch.load may accept a harmless codec)


def test_sacred_container_of_a_payload_is_refused(tmp_path, images):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with fake_modules(_SACRED):
        torch.save({"state_dict": random_state_dict(TINY), "hp": ReadOnlyList([Evil(marker)])}, path)
    r = ok(cli("segment", images, "--out", tmp_path / "m", "--weights", path, "--cache", tmp_path / "c", *FAST), code=5)
    assert not marker.exists() and "system" in r.output and len(r.output.strip().splitlines()) == 1
    with fake_modules(_SACRED):
        torch.save({"state_dict": random_state_dict(TINY), "hp": _Reduce(ReadOnlyList, ("text",))}, path)
    with pytest.raises(RefusedGlobal, match="ReadOnlyList"):
        load_zip_checkpoint(path)


# ------------------------------------------------------------------------------ DINOv3 plus and 7B


def official_dinov3(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of timm's DINOv3 conversion: Meta's own key names (works on meta tensors: shapes only)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.q_bias"):
            vb = sd[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros_like(v), vb])
            out[k.replace("q_bias", "qkv.bias_mask")] = torch.ones(3 * v.shape[0], device=v.device)
            continue
        if k.endswith("attn.v_bias"):
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        k = k.replace("mlp.fc1_g", "mlp.w1").replace("mlp.fc1_x", "mlp.w2")
        if ".mlp.w1" in k or ".mlp.w2" in k or any(x.endswith(".mlp.fc1_g.weight") for x in sd):
            k = k.replace("mlp.fc2", "mlp.w3")
        out[k] = v
    dev = next(iter(sd.values())).device
    out["rope_embed.periods"] = torch.ones(16, device=dev)
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1], device=dev)
    return out


@pytest.mark.parametrize("timm_name,build,expected", [
    ("vit_small_plus_patch16_dinov3_qkvb", {}, "vit_small_plus_patch16_dinov3_qkvb.lvd1689m"),
    ("vit_large_patch16_dinov3_qkvb", {"swiglu_mlp": True, "swiglu_align_to": 8}, "vit_large_patch16_dinov3_qkvb.lvd1689m"),
    ("vit_huge_plus_patch16_dinov3_qkvb", {}, "vit_huge_plus_patch16_dinov3_qkvb.lvd1689m"),
    ("vit_7b_patch16_dinov3", {}, "vit_7b_patch16_dinov3.lvd1689m"),
])
def test_dinov3_plus_and_7b_recognised_from_shapes(timm_name, build, expected):
    """Full-size layouts as meta tensors (no memory): Meta's names and shapes -> the architecture, and every
    tensor maps onto the model built for it (keys and shapes, through timm's converter)."""
    from segcli.vit.backbone import _build_model
    from segcli.vit.checkpoints.vit import dinov3_build, parse

    model = _build_model(timm_name, build)
    official = official_dinov3(model.state_dict())
    if timm_name.startswith("vit_7b"):  # 7B: untied local CLS norm (pretraining only)
        official["local_cls_norm.weight"] = torch.ones(4096, device="meta")
        official["local_cls_norm.bias"] = torch.zeros(4096, device="meta")
    ck = parse(official, "weights file x")
    assert (ck.system, ck.arch) == ("dinov3", expected) and ck.build == build == dinov3_build(ck.state_dict)
    fitted = fit_state_dict(ck.state_dict, _build_model(expected, ck.build), expected, "x")
    assert set(fitted) == set(model.state_dict())


def test_dinov3_small_plus_loads_bit_exact_and_wrong_backbone_loses_nothing(tmp_path):
    from segcli.vit.backbone import load_backbone

    name = "vit_small_plus_patch16_dinov3_qkvb.lvd1689m"
    sd = random_state_dict(name, seed=3)
    path = tmp_path / "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"
    torch.save(official_dinov3(sd), path)
    bb = load_backbone(weights=path, device="cpu")
    assert bb.name == name and all(torch.equal(bb.model.state_dict()[k], v) for k, v in sd.items())
    # Meta's S/16 with --backbone naming the model without q/v biases: an error naming the key, not a silent drop
    s16 = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(official_dinov3(random_state_dict("vit_small_patch16_dinov3_qkvb.lvd1689m", seed=4)), s16)
    with pytest.raises(ModelError, match=r"q/v biases \(blocks\.0\.attn\.qkv\.bias\).*_qkvb"):
        load_backbone("vit_small_patch16_dinov3", weights=s16, device="cpu")
    with pytest.raises(ModelError, match="does not fit"):  # S+ file named as plain S: its SwiGLU keys are unused
        load_backbone("vit_small_patch16_dinov3_qkvb", weights=path, device="cpu")


# ---------------------------------------------------------------------------------------- Orbax


def _orbax_item(item: Path, tree: dict) -> None:
    import msgpack

    from tests.seed_checkpoints import _ext_pack

    item.mkdir(parents=True)
    (item / "_METADATA").write_text(json.dumps({"tree_metadata": {}, "use_zarr3": False}))
    (item / "checkpoint").write_bytes(msgpack.packb(tree, default=_ext_pack, use_bin_type=True))


def test_orbax_directory_with_aggregate_arrays(tmp_path, images):
    """flax's save_checkpoint through Orbax: checkpoint_<step>/{_CHECKPOINT_METADATA, default/{_METADATA, checkpoint}}."""
    src = tmp_path / "loca.msgpack"
    params = save_loca(src, "loca", grid=4, depth=2)
    import msgpack

    from segcli.vit.checkpoints.flax_msgpack import read_msgpack_tree

    step = tmp_path / "ckpts" / "checkpoint_100000"
    _orbax_item(step / "default", read_msgpack_tree(src))
    (step / "_CHECKPOINT_METADATA").write_text(json.dumps({"init_timestamp_nsecs": 1}))
    ck = open_checkpoint(step)
    assert ck.system == "loca" and torch.equal(ck.state_dict["norm.bias"], torch.from_numpy(params["encoder_norm"]["bias"]))
    ok(cli("segment", images, "--out", tmp_path / "m", "--weights", step, "--cache", tmp_path / "c", "--k", 2,
           "--short-side", 64, "--max-side", 96, *FAST))
    assert msgpack  # the aggregate file is flax's msgpack encoding


def test_orbax_tensorstore_directory_says_what_to_pass(tmp_path, images):
    step = tmp_path / "checkpoint_5"
    _orbax_item(step / "default", {"params": {"encoderblock_0": {"kernel": "PLACEHOLDER://params.encoderblock_0.kernel"}}})
    (step / "default" / "manifest.ocdbt").write_bytes(b"\x00" * 16)
    (step / "default" / "ocdbt.process_0").mkdir()
    r = ok(cli("segment", images, "--out", tmp_path / "m", "--weights", step, "--cache", tmp_path / "c", *FAST), code=5)
    line = r.output.strip()
    assert len(line.splitlines()) == 1 and str(step) in line and "TensorStore (OCDBT)" in line
    assert "PyTreeCheckpointer().restore(sys.argv[1])" in line and "--weights weights.msgpack" in line
    empty = tmp_path / "plain_dir"
    empty.mkdir()
    r = ok(cli("segment", images, "--out", tmp_path / "m", "--weights", empty, "--cache", tmp_path / "c", *FAST), code=5)
    assert "not an Orbax checkpoint" in r.output


# ------------------------------------------------------------------------- DINO's position resize


def test_dino_resize_equals_the_upstream_formula():
    from segcli.vit.compat import import_timm
    from segcli.vit.pos_embed import dino_interpolate

    import_timm()  # before timm.layers is imported below: the CPU-torch / torchvision workaround
    from tests.upstream_reference import dino_interpolate_pos_encoding

    pos = torch.randn(1, 1 + 14 * 14, 8, generator=torch.Generator().manual_seed(0))
    for rows, cols in ((14, 14), (28, 42), (20, 16), (7, 9), (14, 15)):
        ref = dino_interpolate_pos_encoding(pos, 16, rows * cols, rows * 16, cols * 16)
        assert torch.equal(dino_interpolate(pos, rows, cols), ref), (rows, cols)
    # and it is not timm's antialiased size-based resize (the test can fail)
    from timm.layers import resample_abs_pos_embed

    timm_pos = resample_abs_pos_embed(pos, (28, 42), (14, 14), num_prefix_tokens=1)
    assert float((timm_pos - dino_interpolate(pos, 28, 42)).abs().max()) > 1e-3


@pytest.mark.parametrize("size", [(224, 224), (448, 672)])
def test_dino_file_features_equal_upstream_forward(tmp_path, size):
    from segcli.vit.backbone import load_backbone
    from tests.upstream_reference import dino_forward

    path = tmp_path / "dino.pth"
    sd = save_checkpoint(path, "dino", name=TINY, seed=2)
    bb = load_backbone(weights=path, device="cpu")
    assert bb.pos_interp == "dino"
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = bb.model.forward_features(x)
    assert float((got - dino_forward(sd, x, heads=3)).abs().max()) < 1e-4


# ----------------------------------------------------------------------- DINOv2's position resize


def _dinov2_interpolate_pos_encoding(pos_embed, patch, npatch, w, h, offset=0.1, antialias=False):
    """facebookresearch/dinov2 DinoVisionTransformer.interpolate_pos_encoding, restated (hub models:
    interpolate_offset=0.1, interpolate_antialias=False); pos_embed is DINOv2's (1, 1 + M*M, C), CLS first."""
    import math

    import torch.nn.functional as F

    previous_dtype = pos_embed.dtype
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch, h // patch
    M = int(math.sqrt(N))
    assert N == M * M
    sx, sy = float(w0 + offset) / M, float(h0 + offset) / M
    patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                                    antialias=antialias, scale_factor=(sx, sy))
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def _dinov2_tokens_by_hand(model, sd_official, x):
    """DINOv2's prepare_tokens_with_masks (patch embed, CLS, + upstream position resize, then registers) fed
    through the timm model's blocks and norm: what DINOv2's forward gives, from the official-layout tensors."""
    patch = model.patch_embed.proj.weight.shape[-1]
    B, _, w, h = x.shape
    t = model.patch_embed(x).reshape(B, -1, sd_official["cls_token"].shape[-1])
    t = torch.cat([sd_official["cls_token"].expand(B, -1, -1), t], dim=1)
    t = t + _dinov2_interpolate_pos_encoding(sd_official["pos_embed"], patch, t.shape[1] - 1, w, h)
    if "register_tokens" in sd_official:
        t = torch.cat([t[:, :1], sd_official["register_tokens"].expand(B, -1, -1), t[:, 1:]], dim=1)
    return model.norm(model.blocks(t))


@pytest.mark.parametrize("reg", [False, True])
def test_dinov2_resize_equals_the_upstream_formula(reg):
    from segcli.vit.compat import import_timm
    from segcli.vit.pos_embed import dinov2_interpolate

    import_timm()  # (repairs a CPU-torch / CUDA-torchvision mismatch before timm.layers is imported)
    from timm.layers import resample_abs_pos_embed

    g = torch.Generator().manual_seed(3)
    official = torch.randn(1, 1 + 37 * 37, 8, generator=g)  # DINOv2's table: CLS row, then the 37x37 grid
    table = official[:, 1:] if reg else official  # timm's register layout has no CLS row (no_embed_class)
    prefix = 0 if reg else 1
    for rows, cols in ((37, 37), (32, 48), (48, 32), (16, 16), (20, 17), (37, 38), (9, 5)):
        ref = _dinov2_interpolate_pos_encoding(official, 14, rows * cols, rows * 14, cols * 14)
        got = dinov2_interpolate(table, rows, cols, prefix=prefix)
        assert torch.equal(got, ref[:, 1:] if reg else ref), (reg, rows, cols)
    # and it is not timm's antialiased size-based resize (the test can fail)
    timm_pos = resample_abs_pos_embed(table, (32, 48), (37, 37), num_prefix_tokens=prefix)
    assert float((timm_pos - dinov2_interpolate(table, 32, 48, prefix=prefix)).abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_dinov2_file_features_equal_upstream_forward(tmp_path, name):
    from segcli.vit.backbone import load_backbone

    path = tmp_path / "dinov2.pth"
    save_checkpoint(path, "dino", name=name, seed=4)
    official = torch.load(path, weights_only=True)
    assert "mask_token" in official and ("register_tokens" in official) == ("reg4" in name)
    bb = load_backbone(weights=path, device="cpu")
    assert bb.pos_interp == "dinov2"
    x = torch.randn(1, 3, 448, 672, generator=torch.Generator().manual_seed(5))  # 32 x 48 patches
    with torch.no_grad():
        got = bb.model.forward_features(x)
        ref = _dinov2_tokens_by_hand(bb.model, official, x)
        assert float((got - ref).abs().max()) < 1e-5
        # timm's own (antialiased, size-based) resize gives different features at this non-square size
        from timm.models.vision_transformer import VisionTransformer

        bb.model._pos_embed = VisionTransformer._pos_embed.__get__(bb.model)
        timm_feats = bb.model.forward_features(x)
    diff = float((timm_feats - got).abs().max())
    print(f"{name}: max |timm resize - DINOv2 resize| in features at 448x672: {diff:.4g}")
    assert diff > 1e-3


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_timm_dinov2_pretrained_weights_use_the_dinov2_resize(name):
    # timm's *_dinov2 pretrained weights are timm-named (ls1.gamma, reg_token): parsed as DINOv2, they keep
    # DINOv2's resize also when they come from timm rather than a file
    from segcli.vit.backbone import _pos_interp
    from segcli.vit.checkpoints.vit import parse as parse_vit

    ck = parse_vit(random_state_dict(name, seed=4), "timm weights")
    assert ck.system == "dinov2" and ck.pos_interp == "dinov2"
    assert _pos_interp(ck, f"{name}.lvd142m", from_file=False) == "dinov2"


# ------------------------------------------------------------------------ hostile files (issue 20)


def _torch_zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None, compress: bool = False) -> None:
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", mode) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", b"little")
        for name, data in (records or {}).items():
            zf.writestr(f"archive/data/{name}", data)
        zf.writestr("archive/version", b"3\n")


def test_memo_index_bomb_is_refused_before_allocating(tmp_path, images):
    """A 200-byte .pth whose pickle stores one object at memo index 2**28 (the C unpickler would size its memo
    table to it: 4 GB): refused by the opcode scan, exit 5, in a process whose peak memory stays small."""
    path = tmp_path / "bomb.pth"
    pkl = b"\x80\x02ccollections\nOrderedDict\n)R" + b"r" + struct.pack("<I", 2**28) + b"."
    _torch_zip(path, pkl)
    with pytest.raises(ModelError, match="memo index 268435456"):
        read_checkpoint(path)
    # The peak of this process's own memory (VmHWM), not ru_maxrss: Linux carries ru_maxrss over from the parent
    # across exec, so under a big pytest worker it would report the worker's size.
    code = ("import re, sys; from segcli.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "print('RSS', hwm); sys.exit(code)")
    r = subprocess.run([sys.executable, "-c", code, "segment", str(images), "--out", str(tmp_path / "m"), "--weights",
                        str(path), "--cache", str(tmp_path / "c"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 5 and "memo index" in r.stderr and "Traceback" not in r.stderr
    rss_mb = int(r.stdout.split("RSS")[-1]) / 1024
    assert rss_mb < 1500, f"peak RSS {rss_mb:.0f} MB"


@pytest.mark.parametrize("member", ["data.pkl", "data/0"])
def test_decompression_bomb_members_are_refused(tmp_path, member):
    path = tmp_path / "zipbomb.pth"
    big = b"\x00" * (64 << 20)
    if member == "data.pkl":
        _torch_zip(path, b"\x80\x02}q\x00." + big, compress=True)
    else:
        _torch_zip(path, b"\x80\x02}q\x00.", {"0": big}, compress=True)
    assert path.stat().st_size < (1 << 20)
    with pytest.raises(ModelError, match=r"claims 67108\d+ bytes in a \d+-byte file"):
        read_checkpoint(path)


def test_stride_zero_view_is_refused_before_copying(tmp_path, images):
    path = tmp_path / "view.pth"
    sd = random_state_dict(TINY)
    sd["pos_embed"] = torch.zeros(1).expand(1 << 16, 1 << 16)  # 4 bytes stored, 16 GiB once contiguous
    torch.save(sd, path)
    r = ok(cli("segment", images, "--out", tmp_path / "m", "--weights", path, "--cache", tmp_path / "c", *FAST), code=5)
    assert "(65536, 65536)" in r.output and str(path) in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("link", [False, True])
def test_fifo_weights_are_refused_without_opening(tmp_path, images, link):
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    target = fifo
    if link:
        target = tmp_path / "link.pth"
        target.symlink_to(fifo)
    code = "import sys; from segcli.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code, "segment", str(images), "--out", str(tmp_path / "m"), "--weights",
                        str(target), "--cache", str(tmp_path / "c"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 5 and "not a regular file (a FIFO)" in r.stderr and str(target) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_non_float_weights_are_refused(tmp_path, images, dtype):
    path = tmp_path / "w.pth"
    sd = random_state_dict(TINY)
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"].to(dtype)
    torch.save(sd, path)
    r = ok(cli("segment", images, "--out", tmp_path / "m", "--weights", path, "--cache", tmp_path / "c", *FAST), code=5)
    assert "blocks.0.attn.qkv.weight" in r.output and "floating-point" in r.output
    assert len(r.output.strip().splitlines()) == 1


def _msgpack(tree) -> bytes:
    import msgpack

    from tests.seed_checkpoints import _ext_pack

    return msgpack.packb(tree, default=_ext_pack, use_bin_type=True)


@pytest.mark.parametrize("case", ["nested-500", "chunked-no-shape", "chunked-int-shape", "chunked-wrong-size"])
def test_malformed_msgpack_is_exit_5_naming_the_file(tmp_path, images, case):
    path = tmp_path / "loca_ckpt"
    if case == "nested-500":
        tree: dict = {"x": 1}
        for _ in range(500):
            tree = {"a": tree}
        data = _msgpack(tree)
        assert len(data) < 2000
    else:
        chunk = {"__msgpack_chunked_array__": True, "chunks": {"0": np.zeros(6, np.float32)}}
        if case == "chunked-int-shape":
            chunk["shape"] = 6
        elif case == "chunked-wrong-size":
            chunk["shape"] = {"0": 1000, "1": 1000}
        data = _msgpack({"params": {"encoderblock_0": {"w": chunk}}})
    path.write_bytes(data)
    r = ok(cli("segment", images, "--out", tmp_path / "m", "--weights", path, "--cache", tmp_path / "c", *FAST), code=5)
    assert str(path) in r.output and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_stego_head_shapes_are_checked_before_building(tmp_path):
    """A STEGO head whose stated width would make cluster2 a (2**16)^2 conv (16 GiB): nothing that size is allocated."""
    from segcli.vit.checkpoints import stego

    sd = {f"net.model.{k}": v for k, v in random_state_dict(TINY).items()}
    sd["net.cluster1.0.weight"] = torch.zeros(70, 1 << 16, 1, 1)
    sd["net.cluster1.0.bias"] = torch.zeros(70)
    sd["net.cluster2.0.weight"] = torch.zeros(4, 4, 1, 1)
    sd["net.cluster2.0.bias"] = torch.zeros(4)
    sd["net.cluster2.2.weight"] = torch.zeros(70, 4, 1, 1)
    sd["net.cluster2.2.bias"] = torch.zeros(70)
    with pytest.raises(ModelError, match="malformed"):
        stego.parse({"state_dict": sd}, "weights file x")


def test_stego_checkpoint_with_real_omegaconf(tmp_path):
    """A STEGO checkpoint whose hyper_parameters hold a real omegaconf DictConfig (``save_hyperparameters()`` of
    ``LitUnsupervisedSegmenter(n_classes, cfg)``), written in a child process so omegaconf is never imported
    here; skipped where omegaconf is not installed (the ``test`` extra lists it)."""
    writer = tmp_path / "write.py"
    path = tmp_path / "stego-real.ckpt"
    writer.write_text(
        "import sys, torch\n"
        "from omegaconf import OmegaConf\n"
        "from tests.seed_checkpoints import stego_tensors, _STEGO_CFG\n"
        f"state, _ = stego_tensors('{TINY}')\n"
        "cfg = OmegaConf.create(dict(_STEGO_CFG, model_type='vit_tiny', pretrained_weights=None,\n"
        "                            crop_types=['five'], nested={'lr': 5e-4}))\n"
        "torch.save({'epoch': 5, 'global_step': 7000, 'pytorch-lightning_version': '1.6.3', 'state_dict': state,\n"
        "            'callbacks': {\"ModelCheckpoint{'monitor': 'test/cluster/mIoU'}\": {'best_model_score': torch.tensor(0.4)}},\n"
        "            'optimizer_states': [], 'lr_schedulers': [], 'hparams_name': 'kwargs',\n"
        "            'hyper_parameters': {'n_classes': 27, 'cfg': cfg}}, sys.argv[1])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(writer), str(path)], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0 and "No module named 'omegaconf'" in r.stderr:
        pytest.skip("omegaconf is not installed (pip install -e '.[test]')")
    assert r.returncode == 0, r.stderr
    assert "omegaconf.dictconfig.DictConfig" in pickle_globals(path)
    ck = open_checkpoint(path)
    assert ck.system == "stego" and ck.head is not None and ck.probe.shape == (27, 70)
    assert "omegaconf" not in sys.modules
