"""The bad-input corpus of both reliability rounds (issues: nothing lost, one-line errors; issue 13).

One parametrised test runs the CLI over every bad input and checks, for each: the exit code, exactly one
message line on stderr (``segcli: error:``, ``segcli: warning:`` or ``skipped``; the closing summary line of a
finished run is not counted), no traceback and no internal error, the inputs byte for byte unchanged, and every
other output intact: a failed run leaves an existing output folder as it was, and a run that skips or repairs
one input writes the other images' masks exactly as a clean run does.

Every case builds its own bad input in a fresh copy of a tiny synthetic dataset (6 images, --features, so no
backbone runs) except the few that are about weights or the backbone feature cache.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from segcli.cli import app
from tests.corrupt import damage, npz_arrays, write_npz
from tests.processes import ROOT, interrupt, segcli_process
from tests.synthetic import make_dataset

runner = CliRunner()
FAST = ["--k", 3, "--assign", "pooled", "--quiet"]


@dataclass
class Case:
    args: list  # after the command name
    code: int
    fragment: str  # must appear in the one message line
    command: str = "segment"
    out: Path | None = None  # the mask folder: pre-filled for failures, compared with a clean run otherwise
    clean: str | None = None  # which clean run the masks must equal: "fit" (segment) or "model" (segment --model)
    changed: list[str] = field(default_factory=list)  # keys whose masks are not compared (the bad ones)
    lines: int = 1  # message lines expected on stderr (the last one holds the fragment)
    process: bool = False  # run `python -m segcli` (click's own parse errors are turned into one line there)
    absent: bool = False  # --out does not exist before and must not exist after (a refused run creates nothing)
    memory_gb: float | None = None  # run as a process under this address-space cap (RLIMIT_AS)
    timeout: float = 300  # a process case that hangs fails after this many seconds


@dataclass
class Env:
    base: Path  # the module's clean runs (read-only)
    data: Path  # this case's own copy of the dataset
    tmp: Path

    @property
    def images(self) -> Path:
        return self.data / "images"

    @property
    def feats(self) -> Path:
        return self.data / "features"

    def features(self, *extra) -> list:
        return ["--features", self.feats, "--cache", self.tmp / "cache", *FAST, *extra]

    def with_model(self, *extra) -> list:
        return ["--model", self.base / "model.segcli", "--features", self.feats, "--cache", self.tmp / "cache", "--quiet", *extra]


def digest_tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def masks(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).with_suffix("").as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@dataclass
class ProcessResult:
    exit_code: int
    stderr: str
    output: str


def run_process(*args, memory_gb: float | None = None, timeout: float = 300) -> ProcessResult:
    """``python -m segcli ARGS``; with ``memory_gb``, under that address-space cap (a blow-up becomes a failure
    of the case, not of the machine); a run past ``timeout`` (a hang) fails the case."""
    import subprocess
    import sys

    def cap() -> None:
        import resource

        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    try:
        p = subprocess.run([sys.executable, "-m", "segcli", *[str(a) for a in args]], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1], timeout=timeout,
                           preexec_fn=cap if memory_gb else None)
    except subprocess.TimeoutExpired:
        pytest.fail(f"segcli {' '.join(map(str, args))} still ran after {timeout} s (a hang)")
    return ProcessResult(p.returncode, p.stderr, p.stdout + p.stderr)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The clean dataset, a clean transductive run (masks + cache), a fitted model and its clean predictions."""
    root = tmp_path_factory.mktemp("corpus")
    make_dataset(root / "data", n_images=6, nested=False)
    d = root / "data"
    r = run_cli("segment", d / "images", "--out", root / "ref_fit", "--features", d / "features", "--cache", root / "cache", *FAST)
    assert r.exit_code == 0, r.output
    r = run_cli("cluster-dataset", d / "images", "--out", root / "model.segcli", "--features", d / "features",
                "--cache", root / "cache_model", *FAST)
    assert r.exit_code == 0, r.output
    r = run_cli("segment", d / "images", "--out", root / "ref_model", "--model", root / "model.segcli", "--features",
                d / "features", "--cache", root / "cache_model", "--quiet")
    assert r.exit_code == 0, r.output
    return root


# ---------------------------------------------------------------------------------------------------- builders
def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _feature_file(env: Env, key: str, **changes) -> None:
    arrays = npz_arrays(env.feats / f"{key}.npz")
    for name, value in changes.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value(arrays[name]) if callable(value) else value
    write_npz(env.feats / f"{key}.npz", arrays)


def _bad_image(data: bytes | None = None, make: Callable[[Path], None] | None = None):
    """An extra image next to the good ones, with a feature file (so that the image itself is what is bad)."""
    def build(env: Env) -> Case:
        path = env.images / "zz_bad.png"
        if make is not None:
            make(path)
        else:
            _write(path, data)
        shutil.copy(env.feats / "img000.npz", env.feats / "zz_bad.npz")
        return Case(env.with_model(), 4, "zz_bad", out=env.tmp / "o", clean="model", changed=["zz_bad"])
    return build


def _bad_features(key: str = "img003", fragment: str = "img003", **changes):
    def build(env: Env) -> Case:
        _feature_file(env, key, **changes)
        return Case(env.with_model(), 4, fragment, out=env.tmp / "o", clean="model", changed=[key])
    return build


def _raw_feature_file(data: bytes):
    def build(env: Env) -> Case:
        _write(env.feats / "img003.npz", data)
        return Case(env.with_model(), 4, "img003", out=env.tmp / "o", clean="model", changed=["img003"])
    return build


def _model_file(make: Callable[[Path, Path], None], fragment: str = ""):
    def build(env: Env) -> Case:
        m = env.tmp / "m.segcli"
        make(env.base / "model.segcli", m)
        return Case(["--model", m, "--features", env.feats, "--cache", env.tmp / "cache", "--quiet"], 5, fragment,
                    out=env.tmp / "o")
    return build


def _edit_model(arrays: dict | None = None, meta: dict | None = None):
    def make(src: Path, dst: Path) -> None:
        from tests.test_reliability import _rewrite_model

        _rewrite_model(src, dst, arrays, meta)
    return make


def _damaged_region_entry(mode: str):
    def build(env: Env) -> Case:
        cache = env.tmp / "cache"
        shutil.copytree(env.base / "cache", cache)
        entries = sorted((cache / "regions").rglob("*.npz"))
        damage(entries[:2] if mode == "swap" else entries[:1], mode)
        return Case(env.features(), 0, "damaged cache entry", out=env.tmp / "o", clean="fit")
    return build


def _weights(data: bytes | None = None, nan: bool = False):
    def build(env: Env) -> Case:
        w = env.tmp / "w.pth"
        if nan:
            import torch

            from tests.checkpoints import SMALL, random_state_dict

            sd = random_state_dict(SMALL, 0)
            sd["pos_embed"] = sd["pos_embed"].clone()  # the helper's tensors are shared
            sd["pos_embed"][0, 0, 0] = float("nan")
            torch.save(sd, w)
        else:
            _write(w, data)
        return Case(["--weights", w, "--cache", env.tmp / "cache", "--device", "cpu", "--quiet"], 5,
                    "NaN" if nan else str(w), out=env.tmp / "o")
    return build


def _option(*opt, fragment: str = ""):
    def build(env: Env) -> Case:
        return Case(env.features(*opt), 2, fragment or opt[0], out=env.tmp / "o")
    return build


def _overlap(option: str, where: Callable[[Env], Path], command: str = "segment"):
    def build(env: Env) -> Case:
        args = env.features() if option != "--cache" else ["--features", env.feats, *FAST]
        if command == "segment":
            args = [*args, option, where(env)] + (["--out", env.tmp / "o"] if option != "--out" else [])
        else:
            args = [*args, option, where(env)]
        return Case(args, 2, "never writes among its inputs", command=command,
                    out=None if option in ("--out", "--masks") else env.tmp / "o")
    return build


def _symlink_escape(env: Env) -> Case:
    out = env.tmp / "o"
    out.mkdir()
    (env.tmp / "outside").mkdir()
    os.symlink(env.tmp / "outside", out / "sub")
    (env.images / "sub").mkdir()
    shutil.copy(env.images / "img000.png", env.images / "sub" / "x.png")
    (env.feats / "sub").mkdir()
    shutil.copy(env.feats / "img000.npz", env.feats / "sub" / "x.npz")
    return Case([*env.with_model(), "--out", out], 3, "outside the output folder", out=None)


def _decompression_bomb(path: Path) -> None:
    Image.new("1", (20000, 20000)).save(path, optimize=False)


def _broken_symlink(path: Path) -> None:
    os.symlink(path.parent / "gone.png", path)


def _list_file(content: bytes):
    def build(env: Env) -> Case:
        lst = _write(env.tmp / "list.txt", content)
        return Case(env.features(), 3, "list", out=env.tmp / "o", command=f"segment:{lst}")
    return build


def _feature_cache_entry_of_other_dim(env: Env) -> Case:
    """A backbone cache entry replaced by a (valid-looking) file of another feature dimension."""
    from tests.checkpoints import SMALL, checkpoint_file

    small = env.tmp / "small"
    small.mkdir()
    for i in range(3):
        shutil.copy(env.images / f"img00{i}.png", small / f"img00{i}.png")
    args = ["--weights", checkpoint_file(SMALL, "timm", 0), "--short-side", 32, "--max-side", 64, "--crf-max-side", 32,
            "--work-max-side", 96, "--device", "cpu", "--fusion", "any", "--regions", "whole", "--k", 3,
            "--assign", "pooled", "--cache", env.tmp / "cache", "--quiet"]
    r = run_cli("segment", small, "--out", env.tmp / "clean", *args)
    assert r.exit_code == 0, r.output
    entry = sorted((env.tmp / "cache" / "features").rglob("*.npz"))[0]
    arrays = npz_arrays(entry)
    arrays["feats"] = arrays["feats"][..., :100].copy()
    write_npz(entry, arrays)
    shutil.rmtree(env.tmp / "cache" / "regions")
    return Case(args, 0, "damaged cache entry", out=env.tmp / "o", clean="clean", command=f"segment:{small}")


def _evaluate(build_pairs: Callable[[Path], list], code: int, fragment: str):
    def build(env: Env) -> Case:
        pred, gt = env.data / "pred", env.data / "gt"
        for name, (p, g) in {"a": ([[0, 0, 1, 1]], [[0, 0, 1, 1]]), "b": ([[1, 1, 0]], [[1, 1, 255]])}.items():
            pred.mkdir(exist_ok=True)
            gt.mkdir(exist_ok=True)
            Image.fromarray(np.array(p, np.uint8)).save(pred / f"{name}.png")
            Image.fromarray(np.array(g, np.uint8)).save(gt / f"{name}.png")
        return Case([pred, gt, *build_pairs(env)], code, fragment, command="evaluate")
    return build


def _drop_gt(env: Env) -> list:
    (env.data / "gt" / "b.png").unlink()
    return ["--num-classes", 2]


def _bad_gt_value(env: Env) -> list:
    Image.fromarray(np.array([[0, 7, 1]], np.uint8)).save(env.data / "gt" / "b.png")
    return ["--num-classes", 2]


# ------------------------------------------------------------------------- round 3 (issue 20) builders
def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _fifo_input(env: Env) -> Case:
    """A FIFO named like an image given as the input: refused by name from a stat, never opened (it blocked)."""
    fifo = _fifo(env.tmp / "pipe.png")
    return Case(env.features(), 3, "not a regular file (a FIFO)", command=f"segment:{fifo}", out=env.tmp / "o",
                process=True, timeout=60)


def _fifo_list_file(env: Env) -> Case:
    fifo = _fifo(env.tmp / "list.txt")
    return Case(env.features(), 3, "not a regular file (a FIFO)", command=f"segment:{fifo}", out=env.tmp / "o",
                process=True, timeout=60)


def _fifo_in_list(link: bool):
    """A FIFO (or a symlink to one) listed in a .txt list next to the good images: skipped by name (exit 4), the
    other images' masks as a clean run writes them."""
    def build(env: Env) -> Case:
        fifo = _fifo(env.tmp / "pipes" / "zz_fifo.png")
        entry = env.images / "zz_fifo.png"
        if link:
            os.symlink(fifo, entry)
        else:
            entry = fifo
        shutil.copy(env.feats / "img000.npz", env.feats / "zz_fifo.npz")
        names = sorted(p.name for p in env.images.glob("img*.png")) + [str(entry)]
        lst = _write(env.images / "list.txt", "\n".join(names).encode() + b"\n")
        return Case(env.with_model(), 4, "not a regular file (a FIFO)", command=f"segment:{lst}", out=env.tmp / "o",
                    clean="model", changed=["zz_fifo"], process=True, timeout=60)
    return build


def _fifo_feature_file(env: Env) -> Case:
    (env.feats / "img003.npz").unlink()
    _fifo(env.feats / "img003.npz")
    return Case(env.with_model(), 4, "not a regular file (a FIFO)", out=env.tmp / "o", clean="model",
                changed=["img003"], process=True, timeout=60)


def _model_out(where: Callable[[Env], Path], code: int, fragment: str):
    """cluster-dataset --out that cannot take the model: refused before the fit, the path left as it was."""
    def build(env: Env) -> Case:
        return Case(env.features("--out", where(env)), code, fragment, command="cluster-dataset")
    return build


def _refused_fresh_out(*extra, code: int, fragment: str, weights: bool = False, model: bool = False):
    """A run refused before any work: its --out (which did not exist) is not left behind, empty."""
    def build(env: Env) -> Case:
        if weights:
            from tests.checkpoints import SMALL, checkpoint_file

            args = ["--weights", checkpoint_file(SMALL, "timm", 0), "--short-side", 32, "--max-side", 64,
                    "--cache", env.tmp / "cache", "--quiet", "--k", 3, *extra]
        elif model:
            args = env.with_model(*extra)
        else:
            args = env.features(*extra)
        return Case(args, code, fragment, out=env.tmp / "fresh" / "o", absent=True)
    return build


def _evaluate_bomb(env: Env) -> list:
    _decompression_bomb(env.data / "pred" / "b.png")
    return ["--num-classes", 2]


def _symlink_loop_gt(env: Env) -> Case:
    case = _evaluate(lambda env: ["--num-classes", 2], 3, "symlink loop")(env)
    loop = env.tmp / "loop"
    os.symlink(loop, loop)
    case.args[1] = loop
    return case


def _big_non_image(env: Env) -> Case:
    """A 256 MiB sparse file that is no image, named .png, under a 3 GB address-space cap: skipped after a 16-byte
    look (it was read or downloaded whole, twice)."""
    big = env.images / "zz_big.png"
    with open(big, "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42")
        f.truncate(256 << 20)
    shutil.copy(env.feats / "img000.npz", env.feats / "zz_big.npz")
    return Case(env.with_model(), 4, "zz_big", out=env.tmp / "o", clean="model", changed=["zz_big"], memory_gb=3)


def _corrupt_features_with_prior(prior: str):
    """Item 13: every feature file holds a proposal, one file is damaged: with every --prior it is reported and
    skipped (exit 4) and the others are segmented (maskdistill/vote refused the whole run, exit 3)."""
    def build(env: Env) -> Case:
        for f in sorted(env.feats.glob("*.npz")):
            arrays = npz_arrays(f)
            arrays["proposal"] = arrays["attn"] >= np.median(arrays["attn"])
            write_npz(f, arrays)
        _write(env.feats / "img003.npz", b"not an npz file at all")
        return Case(env.features("--prior", prior), 4, "img003", out=env.tmp / "o")
    return build


CASES: dict[str, Callable[[Env], Case]] = {
    # ---- round 1: paths and options
    "missing input folder": lambda env: Case(env.features(), 3, "not found", command=f"segment:{env.tmp / 'nope'}", out=env.tmp / "o"),
    "empty input folder": lambda env: (env.tmp.joinpath("empty").mkdir(), Case(env.features(), 3, "no images", command=f"segment:{env.tmp / 'empty'}", out=env.tmp / "o"))[1],
    # Two lines by design: the skipped image, then the error that nothing is left.
    "only bad images": lambda env: (_write(env.tmp / "bad" / "a.jpg", b""),
                                    Case(env.features(), 3, "no usable images", command=f"segment:{env.tmp / 'bad'}", out=env.tmp / "o", lines=2))[1],
    "output is a file": lambda env: Case(env.features(), 3, "is a file", out=_write(env.tmp / "ofile", b"x")),
    "--k 1": _option("--k", "1"),
    "--k 0": _option("--k", "0"),
    "--k -3": _option("--k", "-3"),
    "--split on a plain folder": lambda env: Case(env.features("--split", "val"), 3, "--split", out=env.tmp / "o"),
    "unknown backbone": lambda env: Case(["--backbone", "not_a_model_xyz", "--cache", env.tmp / "c", "--quiet"], 5, "not_a_model_xyz", out=env.tmp / "o"),
    "weights: empty file": _weights(b""),
    "weights: garbage": _weights(b"garbage, not a checkpoint"),
    "weights: truncated zip": _weights(b"PK\x03\x04truncated zip"),
    "model: empty file": _model_file(lambda s, d: _write(d, b"")),
    "model: bad header": _model_file(lambda s, d: _write(d, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")),
    "model: text": _model_file(lambda s, d: _write(d, b"just text")),
    "model: truncated": _model_file(lambda s, d: _write(d, s.read_bytes()[: len(s.read_bytes()) // 2])),
    "model: pickle payload": _model_file(lambda s, d: _write(d, pickle.dumps({"not": "a model"}))),
    "model: missing": _model_file(lambda s, d: None, "not found"),
    "--shard 5/2": lambda env: Case(env.features("--shard", "5/2"), 2, "--shard", command="cluster-dataset"),
    "cluster-dataset without --out": lambda env: Case(env.features(), 2, "--out", command="cluster-dataset"),
    "list file: empty": _list_file(b"# nothing\n\n"),
    "list file: binary": _list_file(b"\xff\xfe\x00\x01garbage"),
    "image: zero bytes": _bad_image(b""),
    "image: text named .png": _bad_image(b"this is not a picture\n" * 10),
    "image: truncated png": lambda env: _bad_image(env.images.joinpath("img001.png").read_bytes()[:300])(env),
    "image: broken symlink": _bad_image(make=_broken_symlink),
    "image: decompression bomb": _bad_image(make=_decompression_bomb),
    "image without a feature file": lambda env: (shutil.copy(env.images / "img000.png", env.images / "zz_nofeat.png"),
                                                 Case(env.with_model(), 4, "zz_nofeat", out=env.tmp / "o", clean="model", changed=["zz_nofeat"]))[1],
    "output subfolder symlinked outside": _symlink_escape,
    # ---- round 2, item 1: outputs overlapping inputs
    "--out is the input": _overlap("--out", lambda env: env.images),
    "--out inside the input": _overlap("--out", lambda env: env.images / "masks"),
    "--out contains the input": _overlap("--out", lambda env: env.data),
    "--overlay is the input": _overlap("--overlay", lambda env: env.images),
    "--cache inside the input": _overlap("--cache", lambda env: env.images / ".cache"),
    "--cache is the features folder": _overlap("--cache", lambda env: env.feats),
    "--masks is the input": _overlap("--masks", lambda env: env.images, command="cluster-dataset"),
    "model --out over an input image": _overlap("--out", lambda env: env.images / "img000.png", command="cluster-dataset"),
    "evaluate --remap-out is the predictions": _evaluate(lambda env: ["--num-classes", 2, "--remap-out", env.data / "pred"], 2, "never writes"),
    "evaluate --json over a ground-truth file": _evaluate(lambda env: ["--num-classes", 2, "--json", env.data / "gt" / "a.png"], 2, "never writes"),
    # ---- round 2, item 2: damaged cache entries (repaired: exit 0, one warning)
    **{f"region cache entry: {m}": _damaged_region_entry(m) for m in ("truncate", "zero", "garble", "shape", "drop")},
    "feature cache entry of another dimension": _feature_cache_entry_of_other_dim,
    # ---- item 3: model files
    "model: array of another shape": _model_file(_edit_model({"dataset_centroids": lambda a: a[:, :-1].copy()}), "dataset_centroids"),
    "model: array of another dtype": _model_file(_edit_model({"part_classes": lambda a: a.astype(np.int32)}), "part_classes"),
    "model: array missing": _model_file(_edit_model({"class_centroids": None}), "class_centroids"),
    "model: NaN centroids": _model_file(_edit_model({"dataset_centroids": lambda a: a * np.float32("nan")}), "NaN"),
    "model: format version not a number": _model_file(_edit_model(meta={"format_version": "x1"}), "format version"),
    "model: format version from the future": _model_file(_edit_model(meta={"format_version": "99"}), "newer segcli"),
    "model: feature dim disagrees": _model_file(_edit_model(meta={"feature_dim": "5"}), "D=5"),
    # ---- item 4: non-finite weights and features
    "weights: NaN": _weights(nan=True),
    "features: NaN in feats": _bad_features(feats=lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a).astype(a.dtype), fragment="NaN"),
    "features: inf in cls": _bad_features(cls=lambda a: a * np.inf, fragment="NaN"),
    "features: overflow float16": _bad_features(feats=lambda a: a.astype(np.float64) * 1e6, fragment="overflow"),
    # ---- item 5: bring-your-own features
    "features: another feature dim": _bad_features(feats=lambda a: np.ones(a.shape[:2] + (a.shape[2] + 2,), np.float16) / 6, fragment="D=32"),
    "features: another CLS dim": _bad_features(cls=lambda a: np.ones(a.size + 1, np.float32), fragment="C=32"),
    "features: empty grid": _bad_features(feats=lambda a: a[:0], attn=lambda a: a[:0], fragment="empty"),
    "features: zero feature dim": _bad_features(feats=lambda a: a[..., :0], fragment="(8, 10, 0)"),
    "features: text array": _bad_features(attn=lambda a: np.full(a.shape, "x"), fragment="not numeric"),
    "features: complex array": _bad_features(cls=lambda a: a.astype(np.complex64), fragment="not numeric"),
    "features: missing array": _bad_features(attn=None, fragment="missing"),
    "features: attn of another grid": _bad_features(attn=lambda a: a[:-1], fragment="attn"),
    "features: not a zip": _raw_feature_file(b"not an npz file at all"),
    "features: pickled objects": _raw_feature_file(b""),  # replaced below by a real pickled npz
    # ---- item 6: options
    "--seed -1": _option("--seed", "-1"),
    "--seed 2**31": _option("--seed", str(2**31)),
    "--threads 0": _option("--threads", "0"),
    "--batch-size 0": _option("--batch-size", "0"),
    "--k 257": _option("--k", "257"),
    "--min-region-px -1": _option("--min-region-px", "-1"),
    "--short-side 4": _option("--short-side", "4"),
    "--crf-max-side 5": _option("--crf-max-side", "5"),
    "--min-region 1.5": _option("--min-region", "1.5"),
    "--parts 1": _option("--parts", "1"),
    "--categories 0": _option("--categories", "0"),
    "--max-samples 10": _option("--max-samples", "10"),
    "--precision fp8": _option("--precision", "fp8"),
    "--seed abc (not a number)": lambda env: Case(env.features("--seed", "abc"), 2, "--seed", out=env.tmp / "o", process=True),
    "unknown option": lambda env: Case(env.features("--colour", "red"), 2, "--colour", out=env.tmp / "o", process=True),
    "missing --out": lambda env: Case(env.features(), 2, "--out", process=True),
    "evaluate: unknown preset": lambda env: (lambda c: (setattr(c, "process", True), c)[1])(
        _evaluate(lambda env: ["--preset", "ade20k"], 2, "ade20k")(env)),
    # ---- evaluate (round 1)
    "evaluate: prediction without ground truth": _evaluate(_drop_gt, 3, "no ground truth"),
    "evaluate: ground-truth value out of range": _evaluate(_bad_gt_value, 3, "7"),
    "evaluate: --workers 0": _evaluate(lambda env: ["--num-classes", 2, "--workers", 0], 2, "--workers"),
    # ---- round 3 (issue 20), item 2: non-regular files, never opened (hang cases: run as processes, bounded)
    "FIFO as the input": _fifo_input,
    "FIFO as the list file": _fifo_list_file,
    "FIFO named .png in the input folder": lambda env: (_fifo(env.images / "zz_fifo.png"),
                                                        shutil.copy(env.feats / "img000.npz", env.feats / "zz_fifo.npz"),
                                                        Case(env.with_model(), 4, "not a regular file (a FIFO)", out=env.tmp / "o",
                                                             clean="model", changed=["zz_fifo"], process=True, timeout=60))[2],
    "FIFO in a list file": _fifo_in_list(link=False),
    "symlink to a FIFO in a list file": _fifo_in_list(link=True),
    "FIFO as a --features file": _fifo_feature_file,
    "FIFO as --model": _model_file(lambda s, d: _fifo(d), "not a regular file (a FIFO)"),
    # ---- item 5/6: model files and method options with --model
    "--model is a folder": _model_file(lambda s, d: d.mkdir(), "is a folder"),
    "--stuff 2 with --model": lambda env: Case(env.with_model("--stuff", 2), 2, "fixed by the model file", out=env.tmp / "o"),
    "--k 9 --assign parts with --model": lambda env: Case(env.with_model("--k", 9, "--assign", "parts"), 2,
                                                          "--k 9, --assign parts", out=env.tmp / "o"),
    # ---- item 8: options whose cost grew without bound (under a memory cap: refused before any allocation)
    "--parts 16000": lambda env: Case(env.features("--assign", "parts", "--parts", 16000), 2, "--parts must be between 2 and 1024",
                                      out=env.tmp / "o", memory_gb=3),
    "--parts above --max-samples": _option("--parts", "500", "--max-samples", "200", fragment="--max-samples 200"),
    "--workers 64": lambda env: Case(env.features("--workers", 64), 2, "--workers must be between 0 and",
                                     out=env.tmp / "o", memory_gb=3),
    # ---- item 9: a large non-image file is never read whole
    "big non-image file named .png": _big_non_image,
    # ---- item 12: model destinations refused before the fit, a user's file never replaced
    "cluster-dataset --out under a file": _model_out(lambda env: _write(env.tmp / "afile", b"x") / "sub" / "m.segcli", 3, "is a file, not a folder"),
    "cluster-dataset --out onto a folder": _model_out(lambda env: (env.tmp / "adir").mkdir() or env.tmp / "adir", 2, "is a folder"),
    "cluster-dataset --out over a user's file": _model_out(lambda env: _write(env.data / "notes.txt", b"my notes\n"), 3,
                                                          "is not a segcli model file"),
    "evaluate: decompression-bomb prediction": _evaluate(_evaluate_bomb, 3, "b.png"),
    "evaluate: --json into a missing folder chain": _evaluate(lambda env: ["--num-classes", 2, "--json", env.tmp / "x" / "y" / "s.json"], 3, "does not exist"),
    "evaluate: --plot into a missing folder chain": _evaluate(lambda env: ["--num-classes", 2, "--plot", env.tmp / "x" / "y" / "p.png"], 3, "does not exist"),
    "evaluate: ground truth is a symlink loop": _symlink_loop_gt,
    # refused runs leave no empty --out behind
    "--assign probe without STEGO weights": _refused_fresh_out("--assign", "probe", "--device", "cpu", code=2, fragment="STEGO", weights=True),
    "--precision fp16 on the CPU": _refused_fresh_out("--precision", "fp16", "--device", "cpu", code=2, fragment="fp16", weights=True),
    "--proposal-heads 1000 on a 6-head ViT": _refused_fresh_out("--proposal-heads", 1000, "--device", "cpu", code=2,
                                                                 fragment="6 attention heads", weights=True),
    "bad model with a fresh --out": lambda env: (_write(env.tmp / "m.segcli", b"garbage"), Case(
        ["--model", env.tmp / "m.segcli", "--features", env.feats, "--cache", env.tmp / "cache", "--quiet"], 5, "m.segcli",
        out=env.tmp / "fresh" / "o", absent=True))[1],
    "--prior maskdistill without proposals, fresh --out": _refused_fresh_out("--prior", "maskdistill", code=3, fragment="proposal"),
    # ---- item 13: one rule for an unusable --features file, whatever the prior (reported and skipped)
    **{f"features: not a zip, --prior {prior}": _corrupt_features_with_prior(prior) for prior in ("levels", "maskdistill", "vote")},
}


def _pickled_npz(env: Env) -> Case:
    import io

    buf = io.BytesIO()
    np.savez(buf, feats=np.array([{"a": 1}], dtype=object), cls=np.zeros(3, np.float32), attn=np.zeros((1, 1)))
    _write(env.feats / "img003.npz", buf.getvalue())
    return Case(env.with_model(), 4, "img003", out=env.tmp / "o", clean="model", changed=["img003"])


CASES["features: pickled objects"] = _pickled_npz


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(base, tmp_path, name):
    env = Env(base, tmp_path / "data", tmp_path)
    shutil.copytree(base / "data", env.data)
    case = CASES[name](env)
    command, _, source = case.command.partition(":")
    source = Path(source) if source else env.images
    if command == "evaluate":
        argv = ["evaluate", *case.args]
    else:
        argv = [command, source, *case.args]
        if case.out is not None and "--out" not in [str(a) for a in case.args] and command == "segment":
            argv += ["--out", case.out]
    # A failure must leave an existing output folder as it was: pre-fill it with a clean run's masks.
    prefilled = None
    if case.absent:
        assert case.out is not None and not case.out.exists()
    elif case.code not in (0, 4) and case.out is not None and not case.out.exists():
        shutil.copytree(base / "ref_model", case.out)
        prefilled = digest_tree(case.out)
    before = digest_tree(env.data)
    source_before = digest_tree(source) if source.is_dir() and not source.is_relative_to(env.data) else None

    if case.process or case.memory_gb:
        r = run_process(*argv, memory_gb=case.memory_gb, timeout=case.timeout)
    else:
        r = run_cli(*argv)

    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    messages = [ln for ln in lines if not ln.startswith(("segment: wrote", "cluster-dataset: "))]
    assert r.exit_code == case.code, f"{name}: exit {r.exit_code}, expected {case.code}\n{r.output}"
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    assert len(messages) == case.lines, f"{name}: expected {case.lines} message line(s), got:\n{r.stderr}"
    assert all(m.startswith(("segcli: error: ", "segcli: warning: ", "skipped ")) for m in messages), messages
    assert case.fragment in messages[-1], f"{name}: {case.fragment!r} not in {messages[-1]!r}"
    if case.code in (2, 3, 5):
        assert messages[-1].startswith("segcli: error: ")
    # Inputs untouched.
    assert digest_tree(env.data) == before
    if source_before is not None:
        assert digest_tree(source) == source_before
    if case.absent:
        assert not case.out.exists(), f"{name}: a refused run left {case.out} behind"
    # Other outputs intact.
    if prefilled is not None:
        assert digest_tree(case.out) == prefilled
    if case.clean is not None:
        ref = masks(base / f"ref_{case.clean}") if case.clean != "clean" else masks(env.tmp / "clean")
        got = masks(case.out)
        expected = {k: v for k, v in ref.items() if k not in case.changed}
        assert {k: v for k, v in got.items() if k not in case.changed} == expected
        assert not any(k in got for k in case.changed)


# ------------------------------------------------ round 3 (issue 20): processes, signals, temporaries, full disks
def _segment_args(base: Path, out: Path, cache: Path, *extra) -> list:
    d = base / "data"
    return ["segment", d / "images", "--out", out, "--features", d / "features", "--cache", cache, *FAST, *extra]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_right_after_the_summary_changes_nothing(base, tmp_path, sig):
    """Item 12: a signal while the interpreter tears down after the summary line exits with the run's own code
    (0) and prints nothing more (it exited 143, or printed a 9-line traceback for SIGINT)."""
    out = tmp_path / "o"
    with segcli_process(_segment_args(base, out, tmp_path / "cache", "--workers", 1)) as proc:
        line = b""
        while not line.startswith(b"segment: wrote"):
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the run ended without a summary"
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        rest = proc.stderr.read().decode()
    assert proc.returncode == 0 and rest.strip() == "", (proc.returncode, rest)
    assert masks(out) == masks(base / "ref_fit")


@pytest.mark.parametrize("delay", [0.3, 0.6, 1.2])
def test_ctrl_c_while_starting_is_one_line(base, tmp_path, delay):
    """Item 12: Ctrl-C while the CLI is still being imported or parses its options (the first second on a loaded
    machine): exit 130 and the one line, never a traceback or a silent 130. (Before Python itself has started,
    a few ms, SIGINT's default action still ends the process.)"""
    with segcli_process(_segment_args(base, tmp_path / "o", tmp_path / "cache")) as proc:
        time.sleep(delay)
        code, err, _ = interrupt(proc)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 130 and len(lines) == 1 and "interrupted" in lines[0], (code, err)


def test_library_warnings_stay_off_stderr(base, tmp_path):
    """Item 12: a warning of a library (here PIL's DecompressionBombWarning, for images just above its pixel
    limit) is not printed: the run says its summary line only. With --debug it would be shown."""
    from segcli.io.images import discover_images

    sizes = [Image.open(item.path).size for item in discover_images(base / "data" / "images")]
    most, least = max(w * h for w, h in sizes), min(w * h for w, h in sizes)
    limit = most // 2 + 1
    if limit >= least:
        pytest.skip("image sizes too far apart for one PIL limit")
    argv = [str(a) for a in _segment_args(base, tmp_path / "o", tmp_path / "cache", "--workers", 0)]
    code = (f"import sys, PIL.Image; PIL.Image.MAX_IMAGE_PIXELS = {limit}; sys.argv = ['segcli'] + {argv!r}; "
            "from segcli.entry import main; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 0 and len(lines) == 1 and lines[0].startswith("segment: wrote"), r.stderr


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_only_segcli_temporaries_of_dead_writers_are_swept(base, tmp_path):
    """Item 12: the start-of-run sweep deletes only temporaries whose names segcli generates and whose writer is
    gone: a user's own hidden *.tmp files stay, and so do a live concurrent run's temporaries."""
    out = tmp_path / "o"
    shutil.copytree(base / "ref_fit", out)
    mine = [_write(out / ".notes.tmp", b"mine"), _write(out / ".img000.png.x1y2.tmp", b"mine too"),
            _write(out / "sub" / ".draft.tmp", b"and this")]
    alive = _write(out / f".img001.png.segcli-{os.getpid()}-abc123.tmp", b"a concurrent run's")
    stale = _write(out / f".img002.png.segcli-{_dead_pid()}-abc123.tmp", b"a killed run's")
    r = run_cli(*_segment_args(base, out, tmp_path / "cache", "--workers", 0))
    assert r.exit_code == 0, r.output
    assert all(p.read_bytes().startswith(b"mine") or p.read_bytes() == b"and this" for p in mine)
    assert alive.exists() and not stale.exists()
    assert masks(out) == masks(base / "ref_fit")


def test_cache_out_of_inodes_is_exit_3(base, tmp_path, monkeypatch):
    """Item 12: a cache file system that cannot create files (ENOSPC: no space or no inodes) ends the run with
    exit 3 and one line naming the file, not an internal error; existing outputs stay as they were."""
    import errno
    import tempfile

    from segcli.io import outputs

    real = tempfile.mkstemp
    cache = tmp_path / "cache"

    def full(*args, dir=None, **kwargs):  # noqa: A002
        if dir is not None and Path(dir).is_relative_to(cache):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", full)
    out = tmp_path / "o"
    shutil.copytree(base / "ref_fit", out)
    before = digest_tree(out)
    r = run_cli(*_segment_args(base, out, cache, "--workers", 0))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 3 and len(lines) == 1 and "No space left on device" in lines[0], r.output
    assert str(cache) in lines[0] and "Traceback" not in r.output
    assert digest_tree(out) == before


@pytest.mark.slow
def test_concurrent_runs_on_one_out_and_cache(base, tmp_path):
    """Item 12: two runs started together on the same --out and warm --cache both finish (exit 0) with the clean
    masks: neither sweeps the other's temporaries."""
    cache, out = tmp_path / "cache", tmp_path / "o"
    shutil.copytree(base / "cache", cache)
    for trial in range(2):
        args = [str(a) for a in _segment_args(base, out, cache, "--workers", 0, "--no-resume")]
        procs = [subprocess.Popen([sys.executable, "-m", "segcli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for _ in range(2)]
        for p in procs:
            p.wait(timeout=300)
            err = p.stderr.read().decode()
            p.stderr.close()
            assert p.returncode == 0, (trial, err)
        assert masks(out) == masks(base / "ref_fit")
        assert not list(out.rglob("*.tmp"))
