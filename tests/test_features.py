"""Features, CLS token and CLS attention against independent computations from the timm model itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segcli.vit.backbone import Backbone, FeatureBatch
from segcli.errors import UsageError
from segcli.vit.features import extract_features
from tests.checkpoints import SMALL, TINY, checkpoint_file, random_backbone

REG = "vit_small_patch14_reg4_dinov2.lvd142m"


@pytest.fixture(scope="module")
def rgb():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    img[20:60, 30:80] = (250, 30, 30)  # a flat "object", so attention is not uniform noise
    return img


def by_hand(bb: Backbone, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keys/queries/values from the last block's norm1 input and qkv weights, the model's own (unfused)
    attention matrix, and forward_features: nothing shared with segcli.vit.features."""
    model = bb.model
    block = model.blocks[-1]
    attn_mod = block.attn
    seen = {}
    h1 = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("block_in", a[0].clone()))
    h2 = attn_mod.attn_drop.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out.clone()))
    fused = attn_mod.fused_attn
    attn_mod.fused_attn = False  # timm's explicit path: softmax -> attn_drop, which we hook
    try:
        with torch.no_grad():
            out = model.forward_features(x)
    finally:
        attn_mod.fused_attn = fused
        h1.remove()
        h2.remove()
    y = block.norm1(seen["block_in"])
    W, b = attn_mod.qkv.weight, attn_mod.qkv.bias
    qkv = y @ W.T + (b if b is not None else 0)
    B, N, _ = qkv.shape
    H, d = attn_mod.num_heads, attn_mod.head_dim
    q, k, v = qkv.reshape(B, N, 3, H, d).unbind(2)  # (B, N, H, d) each
    q = attn_mod.q_norm(q)
    k = attn_mod.k_norm(k)
    # independent softmax from the same q, k (scale written out, not read from the module)
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * d**-0.5
    manual_attn = logits.softmax(-1)
    return {
        "queries": q.reshape(B, N, H * d),
        "keys": k.reshape(B, N, H * d),
        "values": v.reshape(B, N, H * d),
        "tokens": out,
        "model_attn": seen["attn"],
        "manual_attn": manual_attn,
    }


@pytest.mark.parametrize("name", [SMALL, REG])
def test_features_equal_a_direct_computation(name, rgb):
    bb = random_backbone(name)
    x = bb.prepare(rgb, short_side=int(4 * bb.patch_size))[None]
    h, w = x.shape[2] // bb.patch_size, x.shape[3] // bb.patch_size
    P = bb.num_prefix_tokens
    ref = by_hand(bb, x)
    for kind in ("keys", "queries", "values", "tokens"):
        fb = bb.extract(x, kind=kind)
        assert isinstance(fb, FeatureBatch)
        assert fb.feats.shape == (1, h, w, bb.embed_dim) and fb.feats.dtype == torch.float32
        assert fb.feats.device.type == "cpu"
        expect = F.normalize(ref[kind][:, P:], dim=-1).reshape(1, h, w, -1)
        torch.testing.assert_close(fb.feats, expect, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(fb.feats.norm(dim=-1), torch.ones(1, h, w), atol=1e-5, rtol=0)
        torch.testing.assert_close(fb.cls, ref["tokens"][:, 0], atol=2e-5, rtol=1e-4)
    # keys must not be queries or tokens in disguise
    keys = bb.extract(x, "keys").feats
    assert not torch.allclose(keys, bb.extract(x, "queries").feats, atol=1e-3)
    # CLS -> patch attention: the model's own softmax, averaged over heads, prefix columns dropped
    fb = bb.extract(x)
    model_cls = ref["model_attn"][:, :, 0, P:].mean(1).reshape(1, h, w)
    manual_cls = ref["manual_attn"][:, :, 0, P:].mean(1).reshape(1, h, w)
    torch.testing.assert_close(fb.attn, model_cls, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(fb.attn, manual_cls, atol=1e-6, rtol=1e-4)
    total = fb.attn.sum(dim=(1, 2))
    assert torch.all(total <= 1 + 1e-5) and torch.all(fb.attn >= 0)
    if P > 1:  # registers take part of the attention mass
        assert torch.all(total < 1)


def test_registers_are_dropped_from_the_grid(rgb):
    bb = random_backbone(REG)
    x = bb.prepare(rgb, short_side=56)[None]  # 56x70 -> 4x5 patches of 14
    assert tuple(x.shape[2:]) == (56, 70)
    fb = bb.extract(x, kind="tokens")
    assert fb.feats.shape == (1, 4, 5, 384) and fb.attn.shape == (1, 4, 5)
    with torch.no_grad():
        out = bb.model.forward_features(x)
    assert out.shape[1] == 5 + 20
    torch.testing.assert_close(fb.feats.reshape(20, -1), F.normalize(out[0, 5:], dim=-1), atol=2e-5, rtol=1e-4)


def test_batch_equals_single_images_and_extract_features(rgb):
    bb = random_backbone(SMALL)
    other = np.ascontiguousarray(rgb[::-1])
    single = extract_features(bb, rgb, short_side=64)
    assert isinstance(single, FeatureBatch) and len(single) == 1 and single.grid == (4, 5)
    batch = bb.extract(torch.stack([bb.prepare(rgb, 64), bb.prepare(other, 64)]))
    assert batch.feats.shape == (2, 4, 5, 384) and batch.cls.shape == (2, 384) and batch.attn.shape == (2, 4, 5)
    torch.testing.assert_close(batch.feats[:1], single.feats, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch.attn[:1], single.attn, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(batch.cls[:1], single.cls, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batch.feats[0], batch.feats[1])


def test_extract_crops_partial_patches_and_checks_arguments():
    bb = random_backbone(TINY)
    x = torch.zeros(1, 3, 70, 100)
    fb = bb.extract(x)
    assert fb.feats.shape == (1, 4, 6, 192)
    torch.testing.assert_close(fb.feats, bb.extract(x[:, :, :64, :96]).feats)
    with pytest.raises(UsageError):
        bb.extract(x, kind="logits")
    with pytest.raises(ValueError):
        bb.extract(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError):
        bb.extract(torch.zeros(1, 3, 8, 64))


def test_extract_is_inference_only():
    bb = random_backbone(TINY)
    x = torch.zeros(1, 3, 32, 32, requires_grad=True)
    fb = bb.extract(x)
    assert not fb.feats.requires_grad and not fb.cls.requires_grad and not fb.attn.requires_grad


def test_embed_crops_shapes_normalisation_and_batching(rgb):
    bb = random_backbone(TINY)
    crops = [rgb, rgb[:10, :50], rgb[40:, :], np.zeros((1, 1, 3), np.uint8), rgb[:, :, 0]]
    emb = bb.embed_crops(crops, size=32, batch_size=32)
    assert emb.shape == (5, 192) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    small_batches = bb.embed_crops(crops, size=32, batch_size=2)
    np.testing.assert_allclose(small_batches, emb, atol=1e-5)
    # the CLS token of the crop resized to size x size, normalised
    x = bb.prepare(rgb, short_side=32)  # 90x120 -> 32x48: not what embed_crops sees
    assert tuple(x.shape[1:]) != (32, 32)
    from segcli.vit.backbone import resize_normalise

    sq = resize_normalise(rgb, 32, 32, bb.mean, bb.std)[None]
    np.testing.assert_allclose(emb[0], F.normalize(bb.extract(sq).cls, dim=-1)[0].numpy(), atol=1e-5)
    assert bb.embed_crops([], size=32).shape == (0, 192)
    # different crops, different embeddings
    assert np.abs(emb[0] - emb[1]).max() > 1e-3


def test_features_differ_between_weights(rgb):
    a = random_backbone(TINY, seed=0)
    from segcli.vit.backbone import load_backbone

    other = load_backbone(TINY, weights=checkpoint_file(TINY, "timm", 1), device="cpu")
    fa = extract_features(a, rgb, short_side=32)
    fo = extract_features(other, rgb, short_side=32)
    assert not torch.allclose(fa.feats, fo.feats, atol=1e-3)


def test_q_and_k_norms_are_applied(rgb):
    """Models with qk_norm (none of the DINO ones) normalise q and k per head before attention."""
    from segcli.vit.compat import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, qk_norm=True, dynamic_img_size=True, num_classes=0)
    model.eval().requires_grad_(False)
    assert not isinstance(model.blocks[-1].attn.k_norm, torch.nn.Identity)
    bb = Backbone(model, "vit_tiny_patch16_224-qknorm", torch.device("cpu"), "random")
    x = bb.prepare(rgb, short_side=48)[None]
    ref = by_hand(bb, x)
    fb = bb.extract(x, "keys")
    expect = F.normalize(ref["keys"][:, 1:], dim=-1).reshape(fb.feats.shape)
    torch.testing.assert_close(fb.feats, expect, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fb.attn, ref["model_attn"][:, :, 0, 1:].mean(1).reshape(fb.attn.shape), atol=1e-6, rtol=1e-4)
