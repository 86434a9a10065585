"""Per checkpoint family: max |segcli feature - independent restatement of the upstream forward|, at 224x224
and 448x672 (issue 19's closing-note figures).

    python benchmarks/bench_reference.py [--json benchmarks/results/reference.json]

Random ViT-S weights (no pretrained weights exist here) written in each family's own file layout
(tests/checkpoints.py, tests/seed_checkpoints.py), read by segcli (``load_backbone``), and compared with the
restatements in tests/upstream_reference.py (DINO's vision_transformer.py incl. interpolate_pos_encoding,
STEGO's code head, LOCA's flax encoder).  ``timm resize`` rows show what the same DINO file gave with timm's
antialiased resize (segcli before issue 19).  fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = ((224, 224), (448, 672))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "reference.json"))
    args = ap.parse_args()
    from segcli.vit.backbone import load_backbone
    from tests.checkpoints import save_checkpoint
    from tests.seed_checkpoints import save_leopart, save_loca, save_stego
    from tests.upstream_reference import dino_forward, loca_forward, stego_code

    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        files = {}
        files["dino"] = (d / "dino.pth", save_checkpoint(d / "dino.pth", "dino", name="vit_small_patch16_224.dino"))
        files["dino-train"] = (d / "ckpt.pth", save_checkpoint(d / "ckpt.pth", "dino-train", name="vit_small_patch16_224.dino"))
        files["leopart"] = (d / "leo.ckpt", save_leopart(d / "leo.ckpt", wrapped=True, teacher=True))
        files["stego"] = (d / "stego.ckpt", save_stego(d / "stego.ckpt", "omegaconf"))
        files["loca"] = (d / "loca", save_loca(d / "loca", "loca"))
        for family, (path, ref) in files.items():
            bb = load_backbone(weights=path, device="cpu", precision="fp32")
            for h, w in SIZES:
                x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h + w))
                t0 = time.perf_counter()
                with torch.no_grad():
                    tok = bb.model.forward_features(x)
                    if family == "loca":
                        want, got = loca_forward(ref, x), tok
                    elif family == "stego":
                        state, sd = ref
                        up = dino_forward(sd, x, heads=6)
                        want = stego_code(state, up, h // 8, w // 8).reshape(1, -1, state["net.cluster1.0.weight"].shape[0])
                        got = bb.head(tok[:, 1:])
                    else:
                        want, got = dino_forward(ref, x, heads=6), tok
                diff = float((got - want).abs().max())
                rows.append(dict(family=family, system=bb.system, pos_interp=bb.pos_interp or "timm", size=f"{h}x{w}",
                                 max_abs_diff=diff, seconds=round(time.perf_counter() - t0, 2)))
                print(f"{family:11s} {bb.system:8s} {rows[-1]['pos_interp']:9s} {h}x{w:<4d} max|diff| {diff:.2e}", flush=True)
            if family == "dino":  # the same file with timm's antialiased resize: what segcli computed before
                import types

                from timm.models.vision_transformer import VisionTransformer

                bb.model._pos_embed = types.MethodType(VisionTransformer._pos_embed, bb.model)
                for h, w in SIZES:
                    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h + w))
                    with torch.no_grad():
                        diff = float((bb.model.forward_features(x) - dino_forward(ref, x, heads=6)).abs().max())
                    rows.append(dict(family="dino (timm resize)", system="dino", pos_interp="timm", size=f"{h}x{w}",
                                     max_abs_diff=diff, seconds=None))
                    print(f"{'dino timm':11s} {'dino':8s} {'timm':9s} {h}x{w:<4d} max|diff| {diff:.2e}", flush=True)
    print("\n| family | segcli system | position resize | input | max abs diff vs upstream restatement |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['system']} | {r['pos_interp']} | {r['size']} | {r['max_abs_diff']:.2e} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    load = [round(x, 2) for x in os.getloadavg()]  # the seconds are only worth the load they were measured under
    print(f"load average at the end {load[0]} {load[1]} {load[2]} ({os.cpu_count()} CPUs)")
    Path(args.json).write_text(json.dumps({"rows": rows, "torch": torch.__version__, "load_average_end": load},
                                          indent=1))


if __name__ == "__main__":
    main()
