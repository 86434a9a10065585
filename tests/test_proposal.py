"""MaskDistill's object proposal (segcli/method/proposal.py): synthetic queries/keys whose answer is known, a literal
re-statement of the upstream steps on random inputs, the extraction hook, the fusion vote and the file formats."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from segcli.io.cache import ImageFeatures, has_proposal, load_features, save_features
from segcli.errors import BadImageError
from segcli.method.foreground import PROPOSAL_VOTE_WEIGHT, fuse, vote_threshold
from segcli.method.proposal import (
    object_proposal, object_proposals, proposal_candidates, rank_descending, seed_component, threshold_attention,
)

H, D = 6, 16  # heads, head dim (ViT-S/16 has 6 heads)


def unit(i: int, d: int = D) -> torch.Tensor:
    e = torch.zeros(d, dtype=torch.float64)
    e[i] = 1.0
    return e


def build_qk(grid, key_of, cls_query, n_prefix: int = 1):
    """q, k (H, N, d): key_of(y, x) -> (H, d) patch key, cls_query (H, d); other tokens get zero vectors."""
    h, w = grid
    n = n_prefix + h * w
    q = torch.zeros(H, n, D, dtype=torch.float64)
    k = torch.zeros(H, n, D, dtype=torch.float64)
    q[:, 0] = cls_query
    for y, x in itertools.product(range(h), range(w)):
        k[:, n_prefix + y * w + x] = key_of(y, x)
    return q, k


def box(grid, y0, x0, y1, x1) -> np.ndarray:
    m = np.zeros(grid, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ------------------------------------------------------------------ known objects
def test_known_object_is_recovered_exactly():
    """8x10 grid, a 4x5 object whose keys align with the CLS query in every head; background keys orthogonal to
    it.  Decoys: a blob with object-like keys but no CLS attention far away, and one touching the object only
    diagonally (4-connectivity must leave both out)."""
    grid = (8, 10)
    obj = box(grid, 2, 3, 6, 8)
    far = box(grid, 0, 0, 1, 2)  # object-like keys, never a candidate: positive in G_diff, not connected
    diag = np.zeros(grid, bool)
    diag[6, 8] = True  # diagonal neighbour of the object's corner (5, 7)
    rng = np.random.default_rng(0)

    def key_of(y, x):
        if obj[y, x]:  # aligned with the CLS query (dim 0), strength varies so the ranking is not flat
            return torch.stack([(1.0 + float(rng.random())) * unit(0) + 0.3 * unit(1) for _ in range(H)])
        if far[y, x] or diag[y, x]:
            return torch.stack([unit(1) for _ in range(H)])  # positive with the object keys, no CLS component
        return torch.stack([unit(2 + (y * 10 + x) % 3) for _ in range(H)])  # orthogonal to CLS and objects

    q, k = build_qk(grid, key_of, torch.stack([unit(0)] * H))
    got = object_proposal(q, k, grid)
    assert got.dtype == bool and got.shape == grid
    np.testing.assert_array_equal(got, obj)
    # float32 inputs (as the backbone gives them) and a batch give the same answer
    np.testing.assert_array_equal(object_proposal(q.float(), k.float(), grid), obj)
    batch = object_proposals(torch.stack([q, q]).float(), torch.stack([k, k]).float(), grid)
    assert batch.shape == (2, *grid) and batch.dtype == torch.bool
    np.testing.assert_array_equal(batch[1].numpy(), obj)


def test_register_tokens_are_skipped():
    grid = (4, 5)
    obj = box(grid, 1, 1, 3, 3)

    def key_of(y, x):
        return torch.stack([unit(0) if obj[y, x] else unit(3)] * H)

    q, k = build_qk(grid, key_of, torch.stack([unit(0)] * H), n_prefix=5)
    k[:, 1:5] = unit(0)  # register keys that look like the object must not count
    np.testing.assert_array_equal(object_proposal(q, k, grid, n_prefix=5), obj)


def test_seed_on_the_border():
    """The most attended patch is the top-left corner; the object runs along the top and left edges."""
    grid = (6, 7)
    obj = box(grid, 0, 0, 2, 7) | box(grid, 0, 0, 6, 2)

    def key_of(y, x):
        if obj[y, x]:
            return torch.stack([(3.0 if (y, x) == (0, 0) else 1.0) * unit(0)] * H)
        return torch.stack([unit(4)] * H)

    q, k = build_qk(grid, key_of, torch.stack([unit(0)] * H))
    np.testing.assert_array_equal(object_proposal(q, k, grid), obj)
    # the same object in the bottom-right corner, seed at the last patch
    flipped = obj[::-1, ::-1].copy()

    def key_of2(y, x):
        if flipped[y, x]:
            return torch.stack([(3.0 if (y, x) == (5, 6) else 1.0) * unit(0)] * H)
        return torch.stack([unit(4)] * H)

    q, k = build_qk(grid, key_of2, torch.stack([unit(0)] * H))
    np.testing.assert_array_equal(object_proposal(q, k, grid), flipped)


@pytest.mark.parametrize("cls_component", [0.5, 0.0])
def test_flat_cls_attention_seeds_at_the_first_patch(cls_component):
    """Every patch gets the same CLS score (equal, or all zero): ties rank in raster order, so the seed is the
    top-left patch and the proposal is the key-graph group containing it (left half: keys c*e0 + e1, right
    half: c*e0 - e1, negatively correlated with the left for c = 0.5 and orthogonal for c = 0)."""
    grid = (8, 10)
    left = box(grid, 0, 0, 8, 5)

    def key_of(y, x):
        return torch.stack([cls_component * unit(0) + (1.0 if left[y, x] else -1.0) * unit(1)] * H)

    q, k = build_qk(grid, key_of, torch.stack([unit(0)] * H))
    np.testing.assert_array_equal(object_proposal(q, k, grid), left)
    # the groups' keys swapped: still the top-left patch's group, the left half
    q, k = build_qk(grid, lambda y, x: key_of(y, 9 - x), torch.stack([unit(0)] * H))
    np.testing.assert_array_equal(object_proposal(q, k, grid), left)
    # with a 3-column group on the left instead, the proposal is those 3 columns
    narrow = box(grid, 0, 0, 8, 3)
    q, k = build_qk(grid, lambda y, x: key_of(y, 0 if narrow[y, x] else 9), torch.stack([unit(0)] * H))
    np.testing.assert_array_equal(object_proposal(q, k, grid), narrow)


def test_heads_option_changes_the_cls_row():
    """Heads 0-4 attend to object A, head 5 (strongly) to object B: the default (first 5 heads) finds A, all
    heads (0) find B."""
    grid = (6, 8)
    a, b = box(grid, 1, 1, 4, 3), box(grid, 2, 5, 5, 8)

    def key_of(y, x):
        key = torch.zeros(H, D, dtype=torch.float64)
        if a[y, x]:
            key[:5] = unit(0)
        if b[y, x]:
            key[5] = 50.0 * unit(0)
        if not (a[y, x] or b[y, x]):
            key[:] = unit(7)
        return key

    q, k = build_qk(grid, key_of, torch.stack([unit(0)] * H))
    np.testing.assert_array_equal(object_proposal(q, k, grid), a)
    np.testing.assert_array_equal(object_proposal(q, k, grid, heads=5), a)
    np.testing.assert_array_equal(object_proposal(q, k, grid, heads=0), b)
    np.testing.assert_array_equal(object_proposal(q, k, grid, heads=99), b)  # more than the model has = all


def test_candidates_beyond_the_mass_follow_the_attention():
    """Only the seed holds half the CLS mass, so the other candidates are zeroed ties: the next most attended
    patches are taken, not the first ones in raster order."""
    g_cls = np.full(25, 0.1)
    g_cls[12] = 100.0  # the seed, alone above half the mass
    g_cls[20:24] = 1.0
    g_cls[[0, 1, 2, 3, 4]] = 0.5
    g_cls[5] = -3.0  # negative scores stay last
    cand = proposal_candidates(g_cls)
    np.testing.assert_array_equal(cand, [12, 20, 21, 22, 23, 0, 1, 2, 3, 4])  # int(0.4 * 25) = 10
    assert proposal_candidates(np.full(10, 2.0), topk=0.3).tolist() == [0, 1, 2]  # flat: raster order


def test_zero_keys_give_an_empty_proposal():
    grid = (3, 4)
    q, k = build_qk(grid, lambda y, x: torch.zeros(H, D, dtype=torch.float64), torch.stack([unit(0)] * H))
    assert not object_proposal(q, k, grid).any()


def test_tiny_grid_keeps_one_candidate():
    grid = (1, 2)  # int(0.4 * 2) == 0 upstream
    q, k = build_qk(grid, lambda y, x: torch.stack([unit(0) * (2.0 - x)] * H), torch.stack([unit(0)] * H))
    np.testing.assert_array_equal(object_proposal(q, k, grid), np.array([[True, True]]))


def test_bad_shapes_are_rejected():
    q = torch.zeros(H, 1 + 12, D)
    with pytest.raises(ValueError):
        object_proposal(q, q, (3, 5))
    with pytest.raises(ValueError):
        object_proposal(q, q[:, :, :4], (3, 4))


# ------------------------------------------------------------------ the steps, literally, on random inputs
def _literal(q: torch.Tensor, k: torch.Tensor, grid, heads: int = 5, topk: float = 0.4) -> np.ndarray:
    """The upstream steps written out with the full N x N key graph (valid when there are no ties)."""
    from scipy import ndimage

    h, w = grid
    A = q @ k.transpose(-2, -1)  # (H, N, N) raw products
    g_cls = A[:heads, 0, 1:].mean(0, keepdim=True)  # (1, N-1)
    val, idx = torch.sort(g_cls)
    val = val / val.sum(dim=1, keepdim=True)
    th = (torch.cumsum(val, dim=1) > 0.5)[0][torch.argsort(idx)[0]]
    g_cls = g_cls * th
    g_i = sum(k[hh, 1:] @ k[hh, 1:].T for hh in range(k.shape[0]))
    ids = torch.topk(g_cls[0], int(topk * (h * w)))[1]
    seed = int(ids[0])
    src = ids[g_i[seed, ids] > 0]
    g_diff = g_i[src].sum(0).reshape(h, w) > 0
    labels, _ = ndimage.label(g_diff.numpy())
    return labels == labels[divmod(seed, w)]


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_literal_steps_on_random_inputs(seed):
    """Random keys with mixed-sign affinities; the CLS scores are positive and spread little, so the 50 % mass
    covers more than 40 % of the patches and no candidate is a tie (torch.topk's tie order is unspecified)."""
    g = torch.Generator().manual_seed(seed)
    grid = (7, 9)
    q = torch.randn(H, 1 + 63, D, generator=g, dtype=torch.float64)
    k = torch.randn(H, 1 + 63, D, generator=g, dtype=torch.float64) + 0.2 * (seed % 2)
    q[:, 0] = unit(0)
    k[:, :, 0] = 0.3 * (1.0 + torch.rand(H, 64, generator=g, dtype=torch.float64))
    heads = [5, 3, 6][seed % 3]
    g_cls = (k[:heads, 1:, 0]).mean(0).numpy()
    assert threshold_attention(g_cls).sum() > 0.4 * 63
    got = object_proposal(q, k, grid, heads=heads)
    np.testing.assert_array_equal(got, _literal(q, k, grid, heads=heads))
    assert got.any()


def test_threshold_attention():
    v = np.array([1.0, 4.0, 2.0, 3.0])  # total 10: 4 (0.4) + 3 (0.7) reach half the mass
    np.testing.assert_array_equal(threshold_attention(v), [False, True, False, True])
    np.testing.assert_array_equal(threshold_attention(v, mass=0.8), [False, True, True, True])
    flat = np.ones(6)  # ties in raster order: the first three hold half
    np.testing.assert_array_equal(threshold_attention(flat), [True, True, True, False, False, False])
    assert threshold_attention(np.zeros(4)).all()
    np.testing.assert_array_equal(rank_descending(np.array([1.0, 3.0, 3.0, 2.0])), [1, 2, 3, 0])
    np.testing.assert_array_equal(rank_descending(np.array([0.0, 5.0, 0.0, 0.0]), then=np.array([1.0, 5.0, 3.0, 1.0])),
                                  [1, 2, 0, 3])


def test_seed_component_is_4_connected():
    m = np.array([[1, 1, 0], [0, 0, 1], [1, 0, 1]], bool)
    np.testing.assert_array_equal(seed_component(m, (0, 0)), [[1, 1, 0], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(seed_component(m, (1, 2)), [[0, 0, 0], [0, 0, 1], [0, 0, 1]])
    assert not seed_component(m, (1, 1)).any()


# ------------------------------------------------------------------ extraction
def test_compute_features_stores_the_proposal_of_the_last_block():
    from segcli.vit.features import compute_features, split_qkv
    from tests.checkpoints import random_backbone

    bb = random_backbone()
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    fb = compute_features(bb, x)
    assert fb.proposal is not None and fb.proposal.shape == (2, 4, 5) and fb.proposal.dtype == torch.bool
    store = {}  # an independent capture: the fused qkv projection's output, seen by a forward hook
    handle = bb.model.blocks[-1].attn.qkv.register_forward_hook(lambda _m, _i, out: store.__setitem__("qkv", out))
    with torch.inference_mode():
        bb.model.forward_features(x)
    handle.remove()
    q, k, _ = split_qkv(bb.model.blocks[-1].attn, store["qkv"])
    for i in range(2):
        np.testing.assert_array_equal(fb.proposal[i].numpy(), object_proposal(q[i], k[i], (4, 5)))
        assert fb.proposal[i].any()  # the seed is always in it for non-zero keys
    all_heads = compute_features(bb, x, proposal_heads=0).proposal
    for i in range(2):
        np.testing.assert_array_equal(all_heads[i].numpy(), object_proposal(q[i], k[i], (4, 5), heads=0))


# ------------------------------------------------------------------ files
def test_feature_file_round_trip_and_validation(tmp_path):
    feats = np.ones((3, 4, 8), np.float16)
    attn = np.full((3, 4), 0.1, np.float16)
    cls = np.ones(8, np.float32)
    prop = box((3, 4), 0, 1, 2, 3)
    save_features(tmp_path / "a.npz", ImageFeatures(feats, cls, attn, prop))
    got = load_features(tmp_path / "a.npz")
    assert got.proposal.dtype == bool
    np.testing.assert_array_equal(got.proposal, prop)
    assert has_proposal(tmp_path / "a.npz")
    save_features(tmp_path / "b.npz", ImageFeatures(feats, cls, attn))
    assert load_features(tmp_path / "b.npz").proposal is None and not has_proposal(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", feats=feats, cls=cls, attn=attn, proposal=prop.astype(np.uint8))
    np.testing.assert_array_equal(load_features(tmp_path / "c.npz").proposal, prop)
    for bad in (prop[:2], prop.astype(np.uint8) * 2, prop.astype(np.float32) * 0.5):
        np.savez(tmp_path / "d.npz", feats=feats, cls=cls, attn=attn, proposal=bad)
        with pytest.raises(BadImageError, match="proposal"):
            load_features(tmp_path / "d.npz")


def test_cache_namespace_has_the_format_version_and_heads(tmp_path):
    from segcli.io.cache import CACHE_FORMAT
    from segcli.config import SegmentConfig
    from segcli.engines.feature_source import FeatureSource
    from tests.checkpoints import random_backbone

    bb = random_backbone()
    a = FeatureSource(SegmentConfig(), backbone=bb, cache_dir=tmp_path).cache.root
    b = FeatureSource(SegmentConfig(proposal_heads=0), backbone=bb, cache_dir=tmp_path).cache.root
    c = FeatureSource(SegmentConfig(prior="vote"), backbone=bb, cache_dir=tmp_path).cache.root
    assert CACHE_FORMAT >= 2 and a.name.endswith(f"-v{CACHE_FORMAT}")
    assert a != b  # another proposal, another entry
    assert a == c  # the prior does not change the features: switching it never reruns the backbone


# ------------------------------------------------------------------ the fourth vote
def test_three_level_fusion_is_unchanged():
    for votes in itertools.product([0, 1], repeat=3):
        masks = [np.array([[v]], bool) for v in votes]
        n = sum(votes)
        for rule, need in (("any", 1), ("majority", 2), ("all", 3)):
            hard, soft = fuse(masks, rule)
            assert bool(hard[0, 0]) == (n >= need)
            # one vote from the threshold: 0.75 / 0.25
            if n == need:
                assert soft[0, 0] == pytest.approx(0.75, abs=1e-6)
            if n == need - 1:
                assert soft[0, 0] == pytest.approx(0.25, abs=1e-6)


def test_proposal_vote_breaks_majority_ties():
    w = [1.0, 1.0, 1.0, PROPOSAL_VOTE_WEIGHT]
    for *levels, prop in itertools.product([0, 1], repeat=4):
        masks = [np.array([[v]], bool) for v in (*levels, prop)]
        n = sum(levels) + prop
        expected = {
            "any": n >= 1,
            "all": n == 4,
            "majority": n >= 3 or (n == 2 and prop == 1),  # 2-2 ties go the proposal's way
        }
        for rule, want in expected.items():
            hard, soft = fuse(masks, rule, weights=w)
            assert bool(hard[0, 0]) == want, (levels, prop, rule)
            assert (soft[0, 0] > 0.5) == want
    assert vote_threshold(np.array(w), "majority") == (2.0, 2.5)
    # the proposal alone (--prior maskdistill)
    hard, soft = fuse([np.array([[True, False]])], "majority")
    np.testing.assert_array_equal(hard, [[True, False]])
    np.testing.assert_allclose(soft, [[0.75, 0.25]], atol=1e-6)


def test_backbone_without_cls_token_is_refused_for_the_proposal_priors(tmp_path):
    from types import SimpleNamespace

    from segcli.config import SegmentConfig
    from segcli.errors import UsageError
    from segcli.engines.feature_source import FeatureSource

    stub = SimpleNamespace(model=SimpleNamespace(cls_token=None), name="vit_small_patch16_reg4_gap_256",
                           precision="fp32", fingerprint=lambda: "stub")
    src = FeatureSource(SegmentConfig(prior="vote"), backbone=stub, cache_dir=tmp_path)
    with pytest.raises(UsageError, match="needs a CLS token"):
        src.check_proposals([])
