"""``--plot``: a picture of the confusion matrix after matching (rows: true class, normalised per row)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segcli.errors import OutputError


def plot_confusion(result, path) -> None:
    """Save the matched confusion matrix (true class x matched class, row-normalised) as an image."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    C = result.num_classes
    names = list(result.class_names)
    counts = np.asarray(result.matched_confusion).T.astype(np.float64)  # (true C, matched C + 1)
    cols = names + ["unmatched"]
    if counts[:, C].sum() == 0:
        counts, cols = counts[:, :C], names
    rows_sum = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows_sum, out=np.zeros_like(counts), where=rows_sum > 0)

    side = max(5.0, 0.38 * len(cols) + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=8)
    ax.set_yticks(range(C), names, fontsize=8)
    ax.set_xlabel("predicted class (after matching)")
    ax.set_ylabel("ground-truth class")
    if C <= 30:
        for i in range(C):
            for j in range(len(cols)):
                if share[i, j] >= 0.005:
                    ax.text(j, i, f"{100 * share[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
    from segcli.evaluate.report import METHOD_TEXT

    what = "per-image matching" if result.mode == "per-image" else f"{METHOD_TEXT[result.method]} matching"
    ax.set_title(f"{what}: mIoU {100 * result.miou:.2f} %, pixel acc. {100 * result.pixel_accuracy:.2f} %", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's pixels")
    fig.tight_layout()
    import io

    from segcli.io.outputs import atomic_write, check_file_destination

    target = Path(path)
    buf = io.BytesIO()
    try:
        check_file_destination(target, "--plot", create=True)
        fig.savefig(buf, dpi=120, format=target.suffix.lstrip(".").lower() or "png")
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot write {target}: {exc}") from None
    finally:
        plt.close(fig)
    atomic_write(target, lambda fh: fh.write(buf.getvalue()))
