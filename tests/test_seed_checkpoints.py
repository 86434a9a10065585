"""Every seed system's checkpoint layout, written here with random weights (tests/seed_checkpoints.py), read
by content through the CLI: the architecture is read from the file, features equal a direct forward pass of
the same weights (max abs diff <= 1e-5), ``segment`` runs end to end, and a pickle that would run code never
does (exit 5, its marker file never appears)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segcli.vit.backbone import Backbone, load_backbone
from segcli.vit.checkpoints import open_checkpoint
from segcli.errors import ModelError
from segcli.vit.features import pca_saliency
from segcli.method.model import SegModel
from segcli.io.outputs import read_label_png
from tests.checkpoints import save_checkpoint
from tests.cli_helpers import cli, ok
from tests.upstream_reference import dino_forward, loca_forward, stego_code
from tests.seed_checkpoints import (
    LEOPART, PICKLED_LAYOUTS, fake_modules, leopart_tensors, save_leopart, save_loca, save_malicious, save_stego,
)

FAST = ["--device", "cpu", "--quiet", "--crf-max-side", 64, "--work-max-side", 256, "--fusion", "any", "--regions", "whole"]
DINOV3 = "vit_small_patch16_dinov3.lvd1689m"
TOL = 1e-5


def scene(path: Path, w: int, h: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    img = (np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))).astype(np.uint8)
    img[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = rng.integers(0, 255, 3)
    img = np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("seed-images")
    scene(d / "a.png", 320, 256, 0)
    scene(d / "b.png", 320, 256, 1)
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """One file per layout and what its backbone must hold."""
    d = tmp_path_factory.mktemp("seed-ckpts")
    out = {}
    out["leopart"] = (d / "leopart_vits16.ckpt", save_leopart(d / "leopart_vits16.ckpt"))
    out["leopart-lightning"] = (d / "leopart-train.ckpt", save_leopart(d / "leopart-train.ckpt", wrapped=True, teacher=True, seed=1))
    out["stego-omegaconf"] = (d / "stego.ckpt", save_stego(d / "stego.ckpt", "omegaconf"))
    out["stego-lightning-old"] = (d / "stego-old.ckpt", save_stego(d / "stego-old.ckpt", "lightning-old", seed=2))
    out["loca"] = (d / "loca_vsmall_imnet1k", save_loca(d / "loca_vsmall_imnet1k", "loca"))
    out["loca-baseline"] = (d / "loca_baseline", save_loca(d / "loca_baseline", "baseline", seed=3))
    out["dinov3"] = (d / "dinov3.safetensors", save_checkpoint(d / "dinov3.safetensors", "safetensors", name=DINOV3))
    return out


def capture_cli_features(monkeypatch, tmp_path: Path, images: Path, weights: Path, *extra) -> tuple[Backbone, torch.Tensor, object]:
    """Run the CLI's feature extraction (cluster-dataset --shard 1/1) and keep the backbone, its input and its
    float32 FeatureBatch (the cache stores float16). In fp32: the default, auto, is bf16 on CPUs with native
    bf16, and the references here are fp32 forwards."""
    seen = {}
    extract = Backbone.extract

    def spy(self, batch, *args, **kwargs):
        fb = extract(self, batch, *args, **kwargs)
        seen.setdefault("run", (self, batch.clone(), fb))
        return fb

    monkeypatch.setattr(Backbone, "extract", spy)
    ok(cli("cluster-dataset", images, "--shard", "1/1", "--weights", weights, "--cache", tmp_path / "cache",
           "--short-side", 256, "--max-side", 320, "--batch-size", 1, "--precision", "fp32", *FAST, *extra))
    return seen["run"]


def timm_vit(name: str, sd: dict, **kw) -> torch.nn.Module:
    """A fresh timm model filled with ``sd``: the 'direct forward' side of the comparisons."""
    from segcli.vit.compat import import_timm

    m = import_timm().create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kw)
    m.load_state_dict(sd, strict=True)
    return m.eval()


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> float:
    diff = float((a - b).abs().max())
    print(f"max abs diff {diff:.2e} (tolerance {tol:.0e})")  # the figures of the report (pytest -s)
    assert diff <= tol, f"max abs diff {diff:.2e} > {tol:.0e}"
    return diff


# ------------------------------------------------------------------ layouts are recognised by content


@pytest.mark.parametrize("layout,system,arch,feature", [
    ("leopart", "leopart", "vit_small_patch16_224.dino", "tokens"),
    ("leopart-lightning", "leopart", "vit_small_patch16_224.dino", "tokens"),
    ("stego-omegaconf", "stego", "vit_small_patch8_224.dino", "code"),
    ("stego-lightning-old", "stego", "vit_small_patch8_224.dino", "code"),
    ("loca", "loca", "vit_small_patch16_224", "tokens"),
    ("loca-baseline", "loca", "vit_small_patch16_224", "tokens"),
    ("dinov3", "dinov3", DINOV3, "keys"),
])
def test_layout_system_architecture_and_parameters(files, layout, system, arch, feature):
    path, expected = files[layout]
    ck = open_checkpoint(path)
    assert (ck.system, ck.arch, ck.feature) == (system, arch, feature)
    bb = load_backbone(weights=path, device="cpu")  # no name: read from the file
    assert bb.name == arch and bb.system == system
    own = bb.model.state_dict()
    if layout.startswith("loca"):
        assert not bb.has_cls and bb.num_prefix_tokens == 0
        return  # LOCA's tensors are checked through the forward pass below
    if layout.startswith("stego"):
        expected = expected[1]
    for k, v in expected.items():
        assert torch.equal(own[k], v), k  # Leopart: the student (model.*), never the teacher copy


def test_leopart_without_backbone_keys_is_not_leopart(tmp_path):
    """A head-only Leopart file (finetune_head.*) is not a backbone."""
    path = tmp_path / "leopart_vits16_pvoc_lin_head.ckpt"
    torch.save({"finetune_head.weight": torch.zeros(21, 384, 1, 1), "finetune_head.bias": torch.zeros(21)}, path)
    with pytest.raises(ModelError, match="not a ViT checkpoint"):
        load_backbone(weights=path, device="cpu")


# ------------------------------------------------------------- features equal a direct forward (CLI)


@pytest.mark.parametrize("layout", ["leopart", "leopart-lightning"])
def test_leopart_features_through_the_cli(files, images, tmp_path, monkeypatch, layout):
    path, sd = files[layout]
    bb, x, fb = capture_cli_features(monkeypatch, tmp_path, images, path)
    # Leopart's README recipe: timm ViT-S/16, model.* keys with the first component stripped
    raw, _ = leopart_tensors(LEOPART, seed=1 if layout == "leopart-lightning" else 0, teacher=layout == "leopart-lightning")
    recipe = {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith("model.") and "head" not in k and "prototypes" not in k}
    tokens = dino_forward(recipe, x, heads=6)  # Leopart's src/vit.py is DINO's (DINO's position resize)
    h, w = fb.grid
    assert (h, w) == (16, 20) and fb.feats.shape[-1] == 384  # --feature tokens by default for Leopart
    assert_close(fb.feats, F.normalize(tokens[:, 1:], dim=-1).reshape(1, h, w, -1))
    assert_close(fb.cls, tokens[:, 0])
    model_file = tmp_path / "m.segcli"
    ok(cli("cluster-dataset", images, "--out", model_file, "--weights", path, "--cache", tmp_path / "cache",
           "--short-side", 64, "--max-side", 96, "--k", 3, *FAST))
    cfg = SegModel.load(model_file).config
    assert (cfg.backbone, cfg.feature_kind) == (LEOPART, "tokens")
    ok(cli("cluster-dataset", images, "--out", model_file, "--weights", path, "--cache", tmp_path / "cache",
           "--short-side", 64, "--max-side", 96, "--k", 3, "--feature", "keys", *FAST))
    assert SegModel.load(model_file).config.feature_kind == "keys"  # the default is overridable


@pytest.mark.parametrize("layout", ["stego-omegaconf", "stego-lightning-old"])
def test_stego_code_through_the_cli(files, images, tmp_path, monkeypatch, layout):
    path, (state, sd) = files[layout]
    bb, x, fb = capture_cli_features(monkeypatch, tmp_path, images, path)
    h, w = x.shape[2] // 8, x.shape[3] // 8
    # DinoFeaturizer 'feat': DINO's final-norm tokens (DINO's own position resize), CLS dropped, then the code;
    # STEGO's evaluation averages it with the mirrored code of the mirrored image (issue 19 item 8)
    plain = stego_code(state, dino_forward(sd, x, heads=6), h, w)
    mirror = stego_code(state, dino_forward(sd, x.flip(-1), heads=6), h, w).flip(2)
    code = (plain + mirror) / 2
    assert float((F.normalize(plain, dim=-1) - fb.feats).abs().max()) > 1e-3  # the mirror pass is really used
    assert fb.feats.shape == (1, h, w, 70)
    assert_close(fb.feats, F.normalize(code, dim=-1))


@pytest.mark.parametrize("layout", ["loca", "loca-baseline"])
def test_loca_features_through_the_cli(files, images, tmp_path, monkeypatch, layout):
    path, params = files[layout]
    bb, x, fb = capture_cli_features(monkeypatch, tmp_path, images, path)
    ref = loca_forward(params, x)  # (1, N, D): encoder_norm output, an independent implementation
    h, w = fb.grid
    assert (h, w) == (16, 20) and not bb.has_cls
    assert_close(fb.feats, F.normalize(ref, dim=-1).reshape(1, h, w, -1))
    assert_close(fb.cls, ref.mean(dim=1), tol=1e-5)  # the image descriptor: mean of the patch tokens
    assert torch.all(fb.attn >= 0) and abs(float(fb.attn.sum()) - 1) < 1e-5  # PCA saliency, not CLS attention


def model_attention_and_keys(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last block's own attention matrix (timm's explicit path, softmax -> attn_drop) and its keys after
    RoPE, from the block input and the rotary embedding the model hands the block (RoPE by timm's function)."""
    from timm.layers import apply_rot_embed_cat

    block, attn = model.blocks[-1], model.blocks[-1].attn
    seen = {}
    h1 = block.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0].clone(), rope=kw.get("rope")), with_kwargs=True)
    h2 = attn.attn_drop.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out.clone()))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        attn.fused_attn = fused
        h1.remove()
        h2.remove()
    with torch.no_grad():
        y = block.norm1(seen["x"])
        bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias]) if attn.q_bias is not None else attn.qkv.bias
        qkv = y @ attn.qkv.weight.T + (bias if bias is not None else 0)
        B, N, _ = qkv.shape
        k = qkv.reshape(B, N, 3, attn.num_heads, -1)[:, :, 1].transpose(1, 2)
        npt = attn.num_prefix_tokens
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], seen["rope"], half=attn.rotate_half)], dim=2)
    return seen["attn"], k.transpose(1, 2).reshape(B, N, -1)


@pytest.mark.parametrize("name", [DINOV3, "vit_small_patch16_dinov3_qkvb.lvd1689m"])
def test_dinov3_rope_keys_and_cls_attention(files, images, tmp_path, monkeypatch, name):
    if name == DINOV3:
        path, sd = files["dinov3"]
    else:
        path = tmp_path / "qkvb.safetensors"
        sd = save_checkpoint(path, "safetensors", name=name, seed=4)
    bb, x, fb = capture_cli_features(monkeypatch, tmp_path, images, path)
    assert bb.name == name and bb.num_prefix_tokens == 5  # CLS + 4 registers
    model = timm_vit(name.split(".")[0], sd)
    model_attn, keys = model_attention_and_keys(model, x)
    h, w = fb.grid
    assert (h, w) == (16, 20)
    assert_close(fb.attn, model_attn[:, :, 0, 5:].mean(1).reshape(1, h, w), tol=1e-6)  # the model's own softmax
    assert_close(fb.feats, F.normalize(keys[:, 5:], dim=-1).reshape(1, h, w, -1))
    assert float(fb.attn.sum()) < 1  # the registers take part of the CLS attention


# ------------------------------------------------------------------------------ segment end to end


@pytest.mark.parametrize("layout,extra", [
    ("leopart", []), ("leopart-lightning", ["--feature", "keys"]), ("stego-omegaconf", []),
    ("stego-lightning-old", ["--assign", "probe"]), ("loca", []), ("loca-baseline", ["--assign", "pooled"]),
    ("dinov3", []),
])
def test_segment_end_to_end(files, images, tmp_path, layout, extra):
    path, _ = files[layout]
    out = tmp_path / "masks"
    ok(cli("segment", images, "--out", out, "--weights", path, "--k", 3, "--cache", tmp_path / "cache",
           "--short-side", 64, "--max-side", 96, *FAST, *extra))
    for name in ("a", "b"):
        labels = read_label_png(out / f"{name}.png")
        assert labels.shape == (256, 320)
        top = 27 if "--assign" in extra and "probe" in extra else 2
        assert labels.max() <= top


def test_stego_probe_labels_patches_with_the_nearest_cluster(files, images, tmp_path):
    """--assign probe: every foreground patch takes 1 + argmax cosine(code, cluster_probe.clusters)."""
    path, (state, _) = files["stego-omegaconf"]
    model_file = tmp_path / "m.segcli"
    ok(cli("cluster-dataset", images, "--out", model_file, "--weights", path, "--assign", "probe", "--k", 28,
           "--cache", tmp_path / "cache", "--short-side", 64, "--max-side", 96, *FAST))
    m = SegModel.load(model_file)
    probe = F.normalize(state["cluster_probe.clusters"], dim=1).numpy()
    np.testing.assert_allclose(m.part_centroids, probe, atol=1e-6)
    assert list(m.part_classes) == list(range(1, 28))
    out = tmp_path / "masks"
    ok(cli("segment", images, "--model", model_file, "--out", out, "--weights", path, "--cache", tmp_path / "cache",
           "--device", "cpu", "--quiet"))
    assert read_label_png(out / "a.png").max() >= 1
    r = ok(cli("segment", images, "--out", tmp_path / "x", "--weights", path, "--assign", "probe", "--feature", "tokens",
               "--cache", tmp_path / "cache", *FAST), code=2)
    assert "--feature code" in r.output


def test_code_and_probe_need_a_stego_checkpoint(files, images, tmp_path):
    path, _ = files["leopart"]
    r = ok(cli("segment", images, "--out", tmp_path / "x", "--weights", path, "--feature", "code",
               "--cache", tmp_path / "cache", "--short-side", 64, "--max-side", 96, *FAST), code=2)
    assert "STEGO" in r.output


# -------------------------------------------------------------------------- malicious pickles


@pytest.mark.parametrize("layout", PICKLED_LAYOUTS)
def test_malicious_pickle_in_every_pickled_layout(images, tmp_path, layout):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    save_malicious(path, layout, marker)
    r = ok(cli("segment", images, "--out", tmp_path / "masks", "--weights", path, "--cache", tmp_path / "cache", *FAST), code=5)
    assert not marker.exists()
    assert "system" in r.output and str(path) in r.output and len(r.output.strip().splitlines()) == 1
    # with --backbone too (the file is read in load_backbone, not only to find its architecture)
    r = ok(cli("segment", images, "--out", tmp_path / "masks", "--weights", path, "--backbone", "vit_tiny_patch16_224",
               "--cache", tmp_path / "cache", *FAST), code=5)
    assert not marker.exists()


def test_restricted_unpickler_imports_nothing_named_in_the_file(tmp_path, monkeypatch):
    """A STEGO file names omegaconf classes; a module of that name that would write a marker on import is on
    sys.path while the file is read: it is never imported."""
    path = tmp_path / "stego.ckpt"
    save_stego(path, "omegaconf", name="vit_tiny_patch16_224")
    pkg = tmp_path / "site" / "omegaconf"
    pkg.mkdir(parents=True)
    marker = tmp_path / "imported"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (pkg / "dictconfig.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass DictConfig: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    ck = open_checkpoint(path)
    assert ck.system == "stego" and ck.head is not None
    assert not marker.exists() and "omegaconf" not in sys.modules


def test_stand_in_classes_are_gone_after_writing():
    with fake_modules({"omegaconf.dictconfig": {}}):
        assert "omegaconf.dictconfig" in sys.modules
    assert "omegaconf" not in sys.modules


# --------------------------------------------------------------------------------- CLS-free ViTs


def test_pca_saliency_known_answer():
    """Object patches (feature a) inside background patches (feature b), with noise: the object scores higher
    than every background patch, whichever of a/b is which, also when the object is most of the image."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(32), rng.standard_normal(32)
    for obj_feat, bg_feat, box in ((a, b, (3, 7, 4, 9)), (b, a, (3, 7, 4, 9)), (a, b, (1, 9, 1, 11))):
        grid = np.tile(bg_feat, (10, 12, 1))
        r0, r1, c0, c1 = box
        grid[r0:r1, c0:c1] = obj_feat
        grid = grid + 0.05 * rng.standard_normal(grid.shape)
        feats = F.normalize(torch.tensor(grid, dtype=torch.float32), dim=-1)[None]
        s = pca_saliency(feats)[0]
        obj = torch.zeros(10, 12, dtype=torch.bool)
        obj[r0:r1, c0:c1] = True
        assert float(s[obj].min()) > float(s[~obj].max())
        assert torch.all(s >= 0) and abs(float(s.sum()) - 1) < 1e-5
    flat = pca_saliency(torch.ones(1, 4, 5, 8))
    torch.testing.assert_close(flat, torch.full((1, 4, 5), 1 / 20))


def test_cls_free_register_vit_through_the_pipeline(images, tmp_path):
    """A timm *_gap_* register ViT (no CLS token): descriptor = mean patch token, saliency = PCA; segment runs."""
    name = "vit_wee_patch16_reg1_gap_256"
    path = tmp_path / "wee.pth"
    sd = save_checkpoint(path, "timm", name=name)
    bb = load_backbone(name, weights=path, device="cpu")
    assert not bb.has_cls and bb.num_prefix_tokens == 1
    x = bb.prepare(np.asarray(Image.open(images / "a.png").convert("RGB")), short_side=64)[None]
    fb = bb.extract(x, kind="tokens")
    model = timm_vit(name, sd)
    with torch.no_grad():
        tok = model.forward_features(x)
    assert_close(fb.cls, tok[:, 1:].mean(1))
    assert_close(fb.attn, pca_saliency(fb.feats))
    emb = bb.embed_crops([np.asarray(Image.open(images / "a.png").convert("RGB"))], size=64)
    assert emb.shape == (1, bb.embed_dim) and abs(float(np.linalg.norm(emb)) - 1) < 1e-5
    out = tmp_path / "masks"
    ok(cli("segment", images, "--out", out, "--weights", path, "--backbone", name, "--k", 3,
           "--cache", tmp_path / "cache", "--short-side", 64, "--max-side", 96, *FAST))
    assert read_label_png(out / "a.png").shape == (256, 320)


# ------------------------------------------------------------------- weights the user already has


def test_official_file_in_torch_hub_folder_is_used_offline(tmp_path, monkeypatch, images):
    from huggingface_hub import constants

    import segcli.vit.backbone as backbone_mod

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbone_mod, "_hub_reachable", lambda timeout=5.0: False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    folder = tmp_path / "torch-home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    expected = save_checkpoint(folder / "dino_deitsmall16_pretrain.pth", "dino", seed=9)
    bb = load_backbone("dino-s16", device="cpu")
    assert str(folder / "dino_deitsmall16_pretrain.pth") in bb.weights_source
    assert bb.weights_id.startswith("sha256:")
    own = bb.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in expected.items())
    r = ok(cli("segment", images, "--out", tmp_path / "masks", "--k", 3, "--cache", tmp_path / "cache",
               "--short-side", 64, "--max-side", 96, *[a for a in FAST if a != "--quiet"]))
    assert "dino_deitsmall16_pretrain.pth" in r.output and "torch hub" in r.output


def test_hf_cache_hit_says_which_file(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from tests.checkpoints import random_state_dict

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    snap = tmp_path / "hf" / "models--timm--vit_small_patch16_224.dino" / "snapshots" / ("1" * 40)
    snap.mkdir(parents=True)
    save_file(random_state_dict(LEOPART, seed=8), str(snap / "model.safetensors"))
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("1" * 40)
    bb = load_backbone("dino-s16", device="cpu")
    assert str(snap / "model.safetensors") in bb.weights_source and "Hugging Face cache" in bb.weights_source


# ----------------------------------------------------------------------- architecture from the file


def test_architecture_from_file_and_unknown_shapes(tmp_path, images):
    s8 = tmp_path / "dino_deitsmall8_pretrain.pth"
    save_checkpoint(s8, "dino", name="vit_small_patch8_224.dino")
    assert load_backbone(weights=s8, device="cpu").name == "vit_small_patch8_224.dino"
    odd = tmp_path / "odd.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(100, 3, 16, 16), "cls_token": torch.zeros(1, 1, 100)}, odd)
    r = ok(cli("segment", images, "--out", tmp_path / "m", "--weights", odd, "--cache", tmp_path / "c", *FAST), code=5)
    assert "--backbone" in r.output
    bad = tmp_path / "bad_msgpack"
    bad.write_bytes(b"\x82\xa1a\xc1")  # a msgpack map header, then garbage
    r = ok(cli("segment", images, "--out", tmp_path / "m", "--weights", bad, "--cache", tmp_path / "c", *FAST), code=5)
    assert str(bad) in r.output


def test_official_dinov3_layout_is_converted(tmp_path):
    """Meta's own DINOv3 naming (storage_tokens, ls1/ls2.gamma, fused qkv.bias with a zero k part, bias_mask,
    rope_embed.periods, mask_token) is read as the timm *_qkvb model, through timm's converter."""
    name = "vit_small_patch16_dinov3_qkvb.lvd1689m"
    from tests.checkpoints import random_state_dict

    sd = random_state_dict(name, seed=5)
    official = {}
    for k, v in sd.items():
        if k.endswith("attn.q_bias"):
            official[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros_like(v), sd[k.replace("q_bias", "v_bias")]])
            official[k.replace("q_bias", "qkv.bias_mask")] = torch.ones(3 * v.shape[0])
        elif not k.endswith("attn.v_bias"):
            official[k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")] = v
    official["rope_embed.periods"] = torch.rand(16)
    official["mask_token"] = torch.zeros(1, 384)
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(official, path)
    bb = load_backbone(weights=path, device="cpu")
    assert bb.name == name and bb.system == "dinov3"
    own = bb.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())


def test_restricted_unpickler_rebuilds_tensors_bit_identically(tmp_path):
    """Every dtype, views sharing one storage, non-contiguous strides and offsets, next to Lightning objects."""
    from tests.seed_checkpoints import _LIGHTNING, AttributeDict, ModelCheckpoint

    from segcli.vit.checkpoints.safe_pickle import load_zip_checkpoint

    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    tensors = {
        "f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(7), "bool": torch.tensor([True, False, True]), "u8": torch.arange(9, dtype=torch.uint8),
        "view_t": base.t(), "view_slice": base[2:5, 3:9:2], "base": base, "scalar": torch.tensor(3.5),
        "param": torch.nn.Parameter(torch.randn(4)), "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "mixed.ckpt"
    with fake_modules(_LIGHTNING):
        torch.save({"state_dict": tensors, "callbacks": {ModelCheckpoint: {"score": torch.tensor(0.5)}},
                    "hyper_parameters": AttributeDict(lr=0.1, nested={"a": [1, 2, (3, 4)]})}, path)
    got = load_zip_checkpoint(path)
    for k, v in tensors.items():
        g = got["state_dict"][k]
        assert g.dtype == v.dtype and g.shape == v.shape and g.stride() == v.stride() and torch.equal(g, v.detach()), k
    assert got["hyper_parameters"]["nested"] == {"a": [1, 2, (3, 4)]} and got["hyper_parameters"]["lr"] == 0.1
    (cb,) = got["callbacks"].values()
    assert float(cb["score"]) == 0.5


# ---------------------------------------------------------------------------- issue 20: ids and probe models


def test_probe_with_more_clusters_than_a_png_holds_is_refused(images, tmp_path):
    """Item 3: a STEGO probe of 300 clusters would write ids 256.. wrapped to 0.. in the uint8 PNGs: refused
    before any work (exit 5, one line), no output folder left."""
    path = tmp_path / "stego300.ckpt"
    save_stego(path, "omegaconf", extra=273)  # 27 + 273 = 300 probe clusters
    r = ok(cli("segment", images, "--out", tmp_path / "masks", "--weights", path, "--assign", "probe", "--k", 3,
               "--cache", tmp_path / "cache", "--short-side", 64, "--max-side", 96, *FAST), code=5)
    assert "300 clusters" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "masks").exists()


def test_label_ids_never_wrap():
    """The one id-width check: ids above 255 are an error, never a uint8 wrap-around (256 -> 0 = background)."""
    from segcli.io.outputs import label_ids

    assert label_ids(np.array([[0, 255]], np.int64)).dtype == np.uint8
    with pytest.raises(ValueError, match="do not fit"):
        label_ids(np.array([[1, 256]], np.int64))


def test_probe_model_with_a_small_k_loads(files, images, tmp_path):
    """Item 5: cluster-dataset --assign probe --k 3 (a 27-cluster probe) writes a model that segment --model loads."""
    path, _ = files["stego-omegaconf"]
    model_file = tmp_path / "m.segcli"
    ok(cli("cluster-dataset", images, "--out", model_file, "--weights", path, "--assign", "probe", "--k", 3,
           "--cache", tmp_path / "cache", "--short-side", 64, "--max-side", 96, *FAST))
    m = SegModel.load(model_file)
    assert m.config.k == 3 and list(m.part_classes) == list(range(1, 28))
    ok(cli("segment", images, "--model", model_file, "--out", tmp_path / "masks", "--weights", path,
           "--cache", tmp_path / "cache", "--device", "cpu", "--quiet"))
    assert read_label_png(tmp_path / "masks" / "a.png").max() <= 27
