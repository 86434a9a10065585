"""--openvino (segcli.vit.openvino_runtime): an optional extra. Without it, one clear line and a non-zero exit;
with it, the whole run works, converted models are cached and reused, features stay close to torch's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.checkpoints import TINY, checkpoint_file
from tests.cli_helpers import cli, ok, pngs
from tests.test_cli_backbone import scene

HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None


def _images(folder: Path) -> Path:
    folder.mkdir()
    for i, (h, w) in enumerate([(60, 80), (80, 60), (70, 70)]):
        scene(h, w, seed=700 + i).save(folder / f"s{i}.png")
    return folder


def _common(tmp_path: Path) -> list:
    return ["--weights", checkpoint_file(TINY, "timm"), "--k", "3", "--short-side", "224", "--max-side", "448",
            "--device", "cpu", "--quiet", "--cache", tmp_path / "cache"]


@pytest.mark.skipif(HAVE_OPENVINO, reason="openvino is installed here")
def test_without_openvino_the_option_fails_in_one_line(tmp_path):
    images = _images(tmp_path / "images")
    result = cli("segment", images, "--out", tmp_path / "out", "--openvino", *_common(tmp_path))
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install openvino" in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def test_openvino_is_refused_with_the_ray_engine(tmp_path):
    images = _images(tmp_path / "images")
    result = cli("segment", images, "--out", tmp_path / "out", "--openvino", "--engine", "ray", *_common(tmp_path))
    assert result.exit_code != 0 and "--openvino runs with the local engine only" in result.output


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino is not installed (optional extra)")
def test_openvino_run_caches_its_models_and_matches_torch_features(tmp_path):
    import numpy as np
    import torch

    from segcli.vit.backbone import load_backbone
    from segcli.vit.openvino_runtime import use_openvino

    images = _images(tmp_path / "images")
    ok(cli("segment", images, "--out", tmp_path / "ov", "--openvino", *_common(tmp_path)))
    saved = sorted((tmp_path / "cache" / "openvino").glob("*.xml"))
    assert saved and len(pngs(tmp_path / "ov")) == 3
    stamp = {p: p.stat().st_mtime_ns for p in saved}
    ok(cli("segment", images, "--out", tmp_path / "ov2", "--openvino", "--no-feature-cache", *_common(tmp_path)))
    assert {p: p.stat().st_mtime_ns for p in saved} == stamp  # read back, not converted again
    assert pngs(tmp_path / "ov2") == pngs(tmp_path / "ov")

    ref = load_backbone(None, weights=checkpoint_file(TINY, "timm"), device="cpu", precision="fp32")
    ov = load_backbone(None, weights=checkpoint_file(TINY, "timm"), device="cpu", precision="fp32")
    use_openvino(ov, tmp_path / "ovcache")
    x = torch.randn(2, 3, 224, 288, generator=torch.Generator().manual_seed(0))
    a, b = ref.extract(x), ov.extract(x)
    cos = torch.nn.functional.cosine_similarity(a.feats.flatten(0, 2), b.feats.flatten(0, 2), dim=-1)
    assert float(cos.min()) > 0.999
    assert np.allclose(a.attn.numpy(), b.attn.numpy(), atol=2e-3)
