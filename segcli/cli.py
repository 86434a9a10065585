"""The command line: parse options, call the pipeline, report. No method logic lives here.

Only typer and the standard library are imported at start-up so that ``segcli --help`` is instant;
torch, timm and the stages are imported inside the commands.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from segcli import __version__
from segcli.config import DEFAULT_BACKBONE, SegmentConfig
from segcli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_SKIPPED, SegcliError
from segcli.io.storage import parse_option
from segcli.evaluate.command import evaluate_command

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Training-free unsupervised semantic segmentation with a frozen DINO ViT.\n\n"
    "Exit codes: 0 ok, 1 internal error, 2 bad usage, 3 bad input/output paths, "
    "4 finished but some images were skipped, 5 unusable backbone/weights/model, 130 interrupted.",
)

_DEBUG = {"on": bool(os.environ.get("SEGCLI_DEBUG"))}
# Whether the running command's outcome is fixed (its last line is being written, its exit code known): from
# then on SIGINT/SIGTERM change nothing (they are noted in "signalled"; segcli.entry exits with the code at once).
FINISHED = {"done": False, "signalled": False, "interrupted": False}


def _finished(code: int) -> None:  # noqa: ARG001 - the code travels as the command's exit code
    FINISHED["done"] = True


def _on_signal(signum, frame):  # noqa: ANN001
    """SIGINT/SIGTERM during a command: stop it (KeyboardInterrupt -> exit 130 and one line), unless its outcome
    is already fixed (the summary or error line is being written): then the signal is only noted."""
    if FINISHED["done"]:
        FINISHED["signalled"] = True
        return
    FINISHED["interrupted"] = True
    raise KeyboardInterrupt


def _err(message: str) -> None:
    print(f"segcli: error: {message}", file=sys.stderr, flush=True)


def handle_errors(fn: Callable) -> Callable:
    """Turn every failure into one line on stderr and an exit code (tracebacks only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        FINISHED.update(done=False, signalled=False, interrupted=False)
        previous = signal.signal(signal.SIGTERM, _on_signal)
        # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored: restore
        # Ctrl-C / kill -INT so that they always stop the run promptly.
        previous_int = signal.signal(signal.SIGINT, _on_signal)
        from segcli.io import outputs

        outputs.forget_created()
        succeeded = False
        try:
            result = fn(*args, **kwargs)
            succeeded = True
            return result
        except typer.Exit as exc:
            succeeded = exc.exit_code in (0, EXIT_SKIPPED)
            raise
        except (typer.Abort, SystemExit):
            raise
        except SegcliError as exc:
            if _DEBUG["on"]:
                raise
            outputs.remove_created_if_empty()
            _finished(exc.exit_code)
            _err(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            outputs.remove_created_if_empty()
            _finished(EXIT_INTERRUPTED)
            _err("interrupted; finished files are kept: run the same command again to resume")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except MemoryError:
            outputs.remove_created_if_empty()
            _finished(EXIT_INTERNAL)
            _err("out of memory; try a smaller --short-side, --work-max-side or --batch-size")
            raise typer.Exit(EXIT_INTERNAL) from None
        except Exception as exc:  # noqa: BLE001
            if _DEBUG["on"]:
                raise
            outputs.remove_created_if_empty()
            _finished(EXIT_INTERNAL)
            _err(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback and please report it)")
            raise typer.Exit(EXIT_INTERNAL) from None
        finally:
            if succeeded:
                outputs.forget_created()
            else:  # a refused or interrupted run leaves no empty output folder behind
                outputs.remove_created_if_empty()
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"segcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = None,
) -> None:
    # Set on every invocation (not only when given): in-process callers run many commands in one process.
    _DEBUG["on"] = debug or bool(os.environ.get("SEGCLI_DEBUG"))


# Path options that also take object-store URIs (s3://, gs://): a Path, or an ObjectPath (imports no fsspec).
_URI = dict(parser=parse_option, metavar="PATH|URI")

# ---------------------------------------------------------------- options shared by segment and cluster-dataset
Backbone = Annotated[Optional[str], typer.Option("--backbone", "-b", help=f"timm model name or alias (dino-s16, dino-s8, dino-b16, dino-b8, dinov2-s14, dinov2-s14-reg). Default {DEFAULT_BACKBONE}.", rich_help_panel="Backbone")]
Weights = Annotated[Optional[Path], typer.Option("--weights", help="Local checkpoint: DINO/DINOv2/DINOv3 .pth, timm state dict, .safetensors, Leopart .ckpt, STEGO .ckpt or LOCA (flax msgpack); recognised by content, its architecture is read from the file when --backbone is not given (see docs/checkpoints.md). Default: timm's pretrained weights (HF cache, torch hub checkpoints folder, else download).", rich_help_panel="Backbone")]
Device = Annotated[str, typer.Option("--device", help="auto|cpu|cuda|mps", rich_help_panel="Backbone")]
Precision = Annotated[str, typer.Option("--precision", help="auto|fp32|bf16|fp16 backbone arithmetic (autocast). auto: bf16 on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16), else fp32.", rich_help_panel="Backbone")]
ShortSide = Annotated[int, typer.Option("--short-side", help="Backbone input short side (aspect kept, multiple of the patch).", rich_help_panel="Backbone")]
MaxSide = Annotated[int, typer.Option("--max-side", help="Cap on the backbone input long side.", rich_help_panel="Backbone")]
WorkMaxSide = Annotated[int, typer.Option("--work-max-side", help="Larger images are processed at this long side and their mask upsampled to full size.", rich_help_panel="Backbone")]
FeatureKind = Annotated[str, typer.Option("--feature", help="Last-block features: keys|queries|values|tokens|code (STEGO's code). Default: keys; tokens for Leopart and LOCA checkpoints, code for STEGO ones.", rich_help_panel="Backbone")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per backbone batch (images are bucketed by input size over a window of max(64, 16 x batch) images, so batches are full; results do not depend on it).", rich_help_panel="Backbone")]
DecodeWorkers = Annotated[Optional[int], typer.Option("--decode-workers", help="Background threads that decode and preprocess images ahead of the backbone (default: cores - 1, at most 8; 0 = in the main thread). Results do not depend on it.", rich_help_panel="Backbone")]
Compile = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the backbone's blocks (kernels cached on disk under the --cache folder; the first batch of each input size compiles). Compiled features are cached apart.", rich_help_panel="Backbone")]
FeatureCacheOpt = Annotated[bool, typer.Option("--feature-cache/--no-feature-cache", help="Keep each image's features in the --cache folder (default). --no-feature-cache recomputes them in every pass instead (fit and predict read them 2-4 times): cheaper than the file I/O on a GPU, not on a CPU. Region bundles are cached either way.", rich_help_panel="Backbone")]
OpenVINO = Annotated[bool, typer.Option("--openvino/--no-openvino", help="Run the backbone's forward on OpenVINO's CPU runtime (optional: pip install openvino; bf16 on CPUs with native bf16). Converted models are cached under the --cache folder; the first run at each input size converts. Features differ from torch's by rounding and are cached apart.", rich_help_panel="Backbone")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Worker processes for the per-image host work after the features (fusion, refinement, regions, label maps, PNG/overlay writes); the backbone and crop forwards stay in the main process. Default: available cores - 1, except 0 when the backbone runs on the CPU (its forward already uses every core); 0 = in the main process; at most the cores this process may use (at least 2): each worker holds its own copy of the model and more workers than cores only add memory and time. With --engine ray: the backbone actors, one backbone each (default: one per GPU when the run uses GPUs, else 1). Results do not depend on it.", rich_help_panel="Backbone")]
DevicePath = Annotated[Optional[bool], typer.Option("--device-path/--host-path", help="Run the region pass (fusion, image-level k-means, refinement, crops) batched on the backbone's device (default: when it is a CUDA GPU) or image by image in the --workers pool. Same masks either way with --assign pooled/parts; crops resized by torch instead of PIL with cls.", rich_help_panel="Backbone")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch (default: one per physical core, torch's choice). Idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE unless you set it), so a busy machine costs the CPU it took, not more. Results do not depend on it.", rich_help_panel="Backbone")]
K = Annotated[int, typer.Option("--k", help="Number of classes including background (VOC: 21).", rich_help_panel="Method")]
Categories = Annotated[Optional[int], typer.Option("--categories", help="CLS-token image categories for the category level (default: the number of thing classes, k-1, or k-N with --stuff N, but at most one per 10 images).", rich_help_panel="Method")]
Stuff = Annotated[int, typer.Option("--stuff", help="Label the background with N stuff classes: ids 0..N-1 stuff, N..k-1 things (--k counts both); 0 = one background class. Presets: docs/method.md (Scenes).", rich_help_panel="Method")]
Fusion = Annotated[str, typer.Option("--fusion", help="Foreground where majority (2 of 3) | all | any of the levels agree.", rich_help_panel="Method")]
Prior = Annotated[str, typer.Option("--prior", help="Foreground prior: levels (the three clustering levels) | maskdistill (MaskDistill's object proposal alone) | vote (the proposal as a fourth vote; a 2-2 majority tie goes its way).", rich_help_panel="Method")]
ProposalHeads = Annotated[int, typer.Option("--proposal-heads", help="Heads whose CLS row the MaskDistill proposal averages (the first N; 0 = all). 5 = MaskDistill's ViT-S/16 setting.", rich_help_panel="Method")]
Crf = Annotated[bool, typer.Option("--crf/--no-crf", help="Refine the foreground (with --refine's refiner); --no-crf = --refine none.", rich_help_panel="Method")]
Refine = Annotated[str, typer.Option("--refine", help="Refiner of the foreground: meanfield (torch dense-CRF mean-field on a bilateral grid, full size, GPU when the backbone is on one) | densecrf (pydensecrf at --crf-max-side) | none. --no-crf = none.", rich_help_panel="Method")]
CrfMaxSide = Annotated[int, typer.Option("--crf-max-side", help="--refine densecrf: run the CRF at this long side (kernels scaled), then upsample; 0 = full size.", rich_help_panel="Method")]
Assign = Annotated[str, typer.Option("--assign", help="Class assignment: cls (CLS tokens of region crops) | pooled (mean patch feature of each region) | parts (community detection over parts) | probe (STEGO's own cluster probe labels each patch; needs a STEGO checkpoint and --feature code).", rich_help_panel="Method")]
ClassMethod = Annotated[str, typer.Option("--class-method", help="kmeans|spectral clustering of region embeddings.", rich_help_panel="Method")]
Parts = Annotated[int, typer.Option("--parts", help="Number of parts to over-cluster into with --assign parts: 2..1024 and at most --max-samples (the part graph is parts x parts per image).", rich_help_panel="Method")]
Regions = Annotated[str, typer.Option("--regions", help="components (one region per connected component) | whole (the whole foreground).", rich_help_panel="Method")]
MinRegion = Annotated[float, typer.Option("--min-region", help="Drop components smaller than this fraction of the image (capped at --min-region-px).", rich_help_panel="Method")]
MinRegionPx = Annotated[int, typer.Option("--min-region-px", help="A component of at least this many pixels is always kept.", rich_help_panel="Method")]
MaxSamples = Annotated[int, typer.Option("--max-samples", help="Patches sampled from the dataset for each k-means fit (memory bound).", rich_help_panel="Method")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of every random choice: same seed, same masks.", rich_help_panel="Method")]
Cache = Annotated[Optional[Path], typer.Option("--cache", help="Feature/region cache folder (default $SEGCLI_CACHE or ~/.cache/segcli); may be an s3:// or gs:// URI.", rich_help_panel="Input", **_URI)]
Features = Annotated[Optional[Path], typer.Option("--features", help="Use precomputed features DIR/<key>.npz instead of a backbone (format: docs/usage.md, Bring your own features).", rich_help_panel="Input", **_URI)]
Split = Annotated[Optional[str], typer.Option("--split", help="For a VOC layout: the ImageSets/Segmentation list to use (e.g. val).", rich_help_panel="Input")]
Overlay = Annotated[Optional[Path], typer.Option("--overlay", help="Also write colour overlays (JPEG) here, with a legend of the ids shown (--class-names, --no-legend).", rich_help_panel="Output", **_URI)]
ClassNames = Annotated[Optional[str], typer.Option("--class-names", help="Names for the overlay legend: a preset (voc, camvid, cityscapes27, cocostuff27: id i = its class i), a text file (line i names id i, or 'ID NAME' lines) or the --json file of segcli evaluate (each cluster named by its matched class).", rich_help_panel="Output")]
LegendOpt = Annotated[bool, typer.Option("--legend/--no-legend", help="Draw a legend of the ids shown (colour, id, name) in the top-left corner of each --overlay image.", rich_help_panel="Output")]
Resume = Annotated[bool, typer.Option("--resume/--no-resume", help="Keep finished masks of the same model in the output folder.", rich_help_panel="Output")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.", rich_help_panel="Output")]
Engine = Annotated[str, typer.Option("--engine", help="local (this process) | ray (Ray Data: backbone actors and per-image tasks on a Ray cluster; needs the ray extra; docs/scale.md, Running on a cluster). Same masks and model either way.", rich_help_panel="Engine")]
Address = Annotated[Optional[str], typer.Option("--address", help="--engine ray: the cluster to join (auto, HOST:6379, ray://HOST:10001); default: a private local cluster on 127.0.0.1, started for the run and stopped at its end.", rich_help_panel="Engine")]
GpusPerWorker = Annotated[Optional[float], typer.Option("--gpus-per-worker", help="--engine ray: GPUs each backbone actor reserves (fractions share a GPU; default 1 when the cluster has GPUs and --device allows them, else 0).", rich_help_panel="Engine")]
CpusPerWorker = Annotated[float, typer.Option("--cpus-per-worker", help="--engine ray: CPUs each backbone actor reserves (per-image tasks take 1 each).", rich_help_panel="Engine")]


# The options segment and cluster-dataset share, declared once: (parameter, annotated type, default).
_SHARED_OPTIONS = [
    ("overlay", Overlay, None), ("class_names", ClassNames, None), ("legend", LegendOpt, True), ("k", K, 21), ("backbone", Backbone, None), ("weights", Weights, None),
    ("device", Device, "auto"), ("precision", Precision, "auto"), ("short_side", ShortSide, 448),
    ("max_side", MaxSide, 1344), ("work_max_side", WorkMaxSide, 2048), ("feature", FeatureKind, None),
    ("batch_size", BatchSize, 8), ("threads", Threads, None), ("categories", Categories, None),
    ("fusion", Fusion, "majority"), ("crf", Crf, True), ("refine", Refine, SegmentConfig.refine),
    ("crf_max_side", CrfMaxSide, 160), ("assign", Assign, "cls"),
    ("class_method", ClassMethod, "kmeans"), ("parts", Parts, 100), ("regions", Regions, "components"),
    ("min_region", MinRegion, 0.01), ("min_region_px", MinRegionPx, 400), ("max_samples", MaxSamples, 100_000),
    ("seed", Seed, 0), ("cache", Cache, None), ("features", Features, None), ("split", Split, None),
    ("resume", Resume, True), ("quiet", Quiet, False), ("prior", Prior, "levels"), ("proposal_heads", ProposalHeads, 5),
    ("stuff", Stuff, 0),
    ("decode_workers", DecodeWorkers, None), ("compile", Compile, False), ("openvino", OpenVINO, False), ("feature_cache", FeatureCacheOpt, True),
    ("workers", Workers, None), ("device_path", DevicePath, None),
    ("engine", Engine, "local"), ("address", Address, None),
    ("gpus_per_worker", GpusPerWorker, None), ("cpus_per_worker", CpusPerWorker, 1.0),
]


def with_shared_options(fn: Callable) -> Callable:
    """Declare _SHARED_OPTIONS on a command whose own signature ends in ``**opts`` (Typer reads the signature)."""
    sig = inspect.signature(fn, eval_str=True)  # this module's annotations are strings (PEP 563)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, annotation, default in _SHARED_OPTIONS]
    fn.__signature__ = sig.replace(parameters=own + extra)
    return fn


# CLI parameter name -> SegmentConfig field, for the method options both fitting commands take.
_CONFIG_OPTIONS = {
    "backbone": "backbone", "short_side": "short_side", "max_side": "max_side", "work_max_side": "work_max_side",
    "feature": "feature_kind", "k": "k", "categories": "categories", "fusion": "fusion", "crf": "crf", "refine": "refine",
    "crf_max_side": "crf_max_side", "regions": "regions", "min_region": "min_region_frac",
    "min_region_px": "min_region_px", "assign": "assign", "class_method": "class_method", "parts": "n_parts",
    "max_samples": "max_samples", "seed": "seed", "prior": "prior", "proposal_heads": "proposal_heads",
    "stuff": "stuff",
}


def _config(options: dict) -> SegmentConfig:
    """The SegmentConfig of a command's parsed options."""
    from segcli.vit.backbone import resolve_backbone_name

    kw = {field: options[name] for name, field in _CONFIG_OPTIONS.items()}
    from_file = False
    if options.get("weights") is not None and options.get("features") is None and (kw["backbone"] is None or kw["feature_kind"] is None):
        # The file says what it is: its architecture and its system's own default feature.
        from segcli.vit.checkpoints import open_checkpoint
        from segcli.errors import ModelError

        ck = open_checkpoint(options["weights"], keep=True)  # load_backbone takes it from there
        if kw["backbone"] is None:
            if ck.arch is None:
                raise ModelError(f"weights file {options['weights']}: its tensor shapes match no known ViT architecture: pass --backbone")
            kw["backbone"], from_file = ck.arch, True
        kw["feature_kind"] = kw["feature_kind"] or ck.feature
    if not from_file:
        kw["backbone"] = resolve_backbone_name(kw["backbone"] or DEFAULT_BACKBONE)
    kw["feature_kind"] = kw["feature_kind"] or "keys"
    return SegmentConfig(**kw)


def _check_run_options(opts: dict) -> SegmentConfig:
    """Validate every option before any work (exit 2 with one line): the run-time ones here, the method ones
    by building their SegmentConfig, which is returned."""
    from segcli.errors import UsageError

    if opts["threads"] is not None and not 1 <= opts["threads"] <= 4096:
        raise UsageError(f"--threads must be between 1 and 4096, got {opts['threads']}")
    if opts["batch_size"] < 1:
        raise UsageError(f"--batch-size must be at least 1, got {opts['batch_size']}")
    if opts["decode_workers"] is not None and not 0 <= opts["decode_workers"] <= 256:
        raise UsageError(f"--decode-workers must be between 0 and 256, got {opts['decode_workers']}")
    if opts["workers"] is not None and str(opts["engine"]).strip().lower() != "ray":
        from segcli.engines.pool import max_workers

        if not 0 <= opts["workers"] <= max_workers():
            raise UsageError(f"--workers must be between 0 and {max_workers()} (the cores this process may use: "
                             f"more processes only add memory and time), got {opts['workers']}")
    import re

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(opts["device"]).strip().lower()):
        raise UsageError(f"unknown --device {opts['device']!r}; use auto, cpu, cuda, cuda:N or mps")
    if str(opts["precision"]).strip().lower() not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"unknown --precision {opts['precision']!r}; use auto, fp32, bf16 or fp16")
    _check_engine_options(opts)
    return _config(opts)


def _check_engine_options(opts: dict) -> None:
    """--engine and the Ray options (which need --engine ray)."""
    from segcli.errors import UsageError

    engine = str(opts["engine"]).strip().lower()
    if engine not in ("local", "ray"):
        raise UsageError(f"unknown --engine {opts['engine']!r}; use local or ray")
    opts["engine"] = engine
    if engine != "ray":
        given = [flag for flag, name, default in (("--address", "address", None),
                 ("--gpus-per-worker", "gpus_per_worker", None), ("--cpus-per-worker", "cpus_per_worker", 1.0))
                 if opts[name] != default]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --engine ray")
    if engine == "ray" and opts.get("openvino"):
        raise UsageError("--openvino runs with the local engine only; drop --engine ray or --openvino")
    if engine == "ray" and opts["workers"] is not None and not 1 <= opts["workers"] <= 4096:
        raise UsageError(f"--workers with --engine ray (backbone actors) must be between 1 and 4096, got {opts['workers']}")
    if opts["gpus_per_worker"] is not None and not 0 <= opts["gpus_per_worker"] <= 64:
        raise UsageError(f"--gpus-per-worker must be between 0 and 64, got {opts['gpus_per_worker']}")
    if not 0 < opts["cpus_per_worker"] <= 1024:
        raise UsageError(f"--cpus-per-worker must be above 0 (at most 1024), got {opts['cpus_per_worker']}")
    if opts["address"] is not None and not str(opts["address"]).strip():
        raise UsageError("--address is empty")


def _protect_inputs(source: Path, items: list, opts: dict, folders: dict, model_in: Path | None = None,
                    model_out: Path | None = None) -> None:
    """Refuse outputs (and the cache) that are, contain or lie inside an input (see check_apart_from_inputs)."""
    from segcli.io import storage
    from segcli.engines.feature_source import default_cache_dir
    from segcli.io.outputs import check_apart_from_inputs

    is_dir = storage.is_dir(source)
    dirs = [source] if is_dir else []
    files = [item.path for item in items] + ([source] if not is_dir and storage.is_file(source) else [])
    if opts["features"] is not None:
        dirs.append(opts["features"])
    files += [p for p in (opts["weights"], model_in) if p is not None]
    folders = {**folders, "--overlay": opts["overlay"], "--cache": opts["cache"] or default_cache_dir()}
    check_apart_from_inputs(folders, dirs, files, {"--out": model_out})


def _given_options() -> set[str] | None:
    """The parameters typed on the command line (or set from the environment), from click's context; None
    when there is no context (a direct call)."""
    try:
        from typer._click.core import ParameterSource
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - another typer layout
        return None
    ctx = get_current_context(silent=True)
    if ctx is None:
        return None
    return {name for name in ctx.params
            if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}


def _check_model_options(opts: dict, fitted, model: Path) -> None:  # noqa: ANN001
    """segment --model: the method is the model file's. A method option given with a value other than the
    model's is refused (exit 2) rather than silently ignored; one given with the model's own value is fine."""
    from segcli.errors import UsageError

    given = _given_options()
    defaults = {name: default for name, _, default in _SHARED_OPTIONS}
    config = fitted.config
    differ = []
    for name, fld in _CONFIG_OPTIONS.items():
        if name == "backbone":  # checked on its own (resolved aliases)
            continue
        typed = name in given if given is not None else opts[name] != defaults.get(name)
        if typed and opts[name] is not None and opts[name] != getattr(config, fld):
            differ.append((name, opts[name], getattr(config, fld)))
    if differ:
        flags = ", ".join(f"--{n.replace('_', '-')} {v}" for n, v, _ in differ)
        theirs = ", ".join(f"{n.replace('_', '-')}={m}" for n, _, m in differ)
        raise UsageError(f"{flags}: the method is fixed by the model file {model} ({theirs}); drop these options "
                         "or fit another model with cluster-dataset")


def _check_remote_outputs(*folders) -> None:
    """Object-store folders written only at the end of a run (overlays, the model file's prefix): a missing
    bucket or missing credentials stop the run before any work, not after the fit."""
    from segcli.io import storage

    for folder in folders:
        if storage.is_remote(folder):
            storage.check_writable(folder)


def _segmenter(config: SegmentConfig, reporter, opts: dict, model=None):
    """The pipeline for a command's parsed options (the run-time ones; the method ones are in config)."""
    from segcli.pipeline import Segmenter

    from segcli.vit.runtime import set_threads

    set_threads(opts["threads"])
    kwargs = dict(model=model, reporter=reporter, weights=opts["weights"], device=opts["device"],
                  precision=opts["precision"], cache_dir=opts["cache"], features_dir=opts["features"],
                  batch_size=opts["batch_size"], decode_workers=opts["decode_workers"], compile=opts["compile"],
                  feature_cache=opts["feature_cache"])
    if opts["openvino"]:
        kwargs["openvino"] = True
    if opts["engine"] == "ray":
        from segcli.ray_segmenter import RaySegmenter

        return RaySegmenter(config, ray_options=_ray_options(opts), threads=opts["threads"], **kwargs)
    return Segmenter(config, workers=opts["workers"], device_path=opts["device_path"], **kwargs)


def _ray_options(opts: dict):
    from segcli.engines.ray_cluster import RayOptions

    return RayOptions(address=opts["address"], workers=opts["workers"], gpus_per_worker=opts["gpus_per_worker"],
                      cpus_per_worker=opts["cpus_per_worker"])


def _engine_session(opts: dict):
    """The engine's lifetime around a command's work: for --engine ray, a Ray session (a local cluster started
    and stopped, or the --address cluster joined and left); nothing for the local engine."""
    if opts["engine"] != "ray":
        import contextlib

        return contextlib.nullcontext()
    from segcli.engines.ray_cluster import ray_session

    return ray_session(_ray_options(opts))


def _legend(opts: dict):
    """The overlays' legend (--class-names, --legend/--no-legend), its names read before any work."""
    from segcli.evaluate.class_names import read_class_names
    from segcli.io.legend import Legend

    names = read_class_names(opts["class_names"]) if opts["class_names"] is not None else {}
    return Legend.of(names, opts["legend"])


def _record(command: str, seg, images: Path, items: list, out: Path, opts: dict, summary, model_file: Path | None,
            started: float, legend) -> None:
    """Write the run record (segcli-run.json) beside the masks: how they were made, for `segcli report`."""
    from segcli.io.run_record import run_record, write_run_record

    write_run_record(out, run_record(command, images=images, items=items, out=out, overlay=opts["overlay"],
                                     model_file=model_file, seg=seg, opts=opts, summary=summary,
                                     seconds=time.perf_counter() - started, class_names=dict(legend.names)))


def _finish(command: str, summary, out: Path | None, started: float) -> None:
    from rich.console import Console

    where = f" to {out}" if out is not None else ""
    _finished(EXIT_SKIPPED if summary.skipped else 0)  # the run is over: a signal now changes nothing
    Console(stderr=True, highlight=False).print(
        f"{command}: wrote {summary.written} masks{where} ({summary.reused} kept from an earlier run, "
        f"{len(summary.skipped)} skipped) in {time.perf_counter() - started:.1f} s", soft_wrap=True
    )
    if summary.skipped:
        raise typer.Exit(EXIT_SKIPPED)


@app.command()
@handle_errors
@with_shared_options
def segment(
    images: Annotated[Path, typer.Argument(help="Folder of images (recursive), VOC layout, or a .txt list of paths; or an s3:// / gs:// prefix (docs/scale.md, Data in object stores).", **_URI)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the label PNGs (same relative paths and stems); may be an s3:// or gs:// URI.", rich_help_panel="Output", **_URI)],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Fitted model from cluster-dataset (a path or an s3:// / gs:// URI); without it segment fits on its own input first.", rich_help_panel="Method", **_URI)] = None,
    **opts,
) -> None:
    """Write one label PNG per image: 0 = background, 1..k-1 = classes (with --stuff N: 0..N-1 stuff, N..k-1 things)."""
    from segcli.io.images import discover_images
    from segcli.method.model import SegModel
    from segcli.io.outputs import prepare_output_dir
    from segcli.report import RichReporter

    started = time.perf_counter()
    reporter = RichReporter(opts["quiet"])
    config = _check_run_options(opts)
    legend = _legend(opts)
    items = discover_images(images, opts["split"])
    _protect_inputs(images, items, opts, {"--out": out}, model_in=model)
    prepare_output_dir(out)
    _check_remote_outputs(opts["overlay"])
    fitted = None
    if model is not None:
        fitted = SegModel.load(model)
        if opts["backbone"] is not None:
            from segcli.vit.backbone import resolve_backbone_name
            from segcli.errors import ModelError

            if resolve_backbone_name(opts["backbone"]) != fitted.config.backbone:
                raise ModelError(f"{model} was fitted with backbone {fitted.config.backbone}, not {opts['backbone']}")
        _check_model_options(opts, fitted, model)
    with _engine_session(opts):
        if fitted is not None:
            seg = _segmenter(fitted.config, reporter, opts, model=fitted)
        else:
            seg = _segmenter(config, reporter, opts).fit(items)
        summary = seg.predict(items, out, overlay_dir=opts["overlay"], resume=opts["resume"], legend=legend)
    _record("segment", seg, images, items, out, opts, summary, model, started, legend)
    _finish("segment", summary, out, started)


@app.command("cluster-dataset")
@handle_errors
@with_shared_options
def cluster_dataset(
    dataset: Annotated[Path, typer.Argument(help="Folder of images (recursive), VOC layout (with --split), or a .txt list of paths; or an s3:// / gs:// prefix.", **_URI)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the fitted model (e.g. model.segcli, or an s3:// / gs:// URI).", rich_help_panel="Output", **_URI)] = None,
    masks: Annotated[Optional[Path], typer.Option("--masks", help="Also write the label PNGs of the dataset here (a folder or an s3:// / gs:// prefix).", rich_help_panel="Output", **_URI)] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="I/N: only extract features of the I-th of N parts into the cache (1-based), then exit; run once more without --shard to fit.", rich_help_panel="Input")] = None,
    **opts,
) -> None:
    """Fit the dataset-level model (the 'fit' of fit/predict) and save it for `segment --model`."""
    from segcli.errors import UsageError
    from segcli.io.images import discover_images
    from segcli.report import RichReporter

    started = time.perf_counter()
    reporter = RichReporter(opts["quiet"])
    part = _parse_shard(shard) if shard else None
    if part is not None and not opts["feature_cache"]:
        raise UsageError("--shard fills the feature cache: it cannot run with --no-feature-cache")
    if part is None and out is None and masks is None:
        raise UsageError("give --out FILE for the model (and/or --masks DIR), or --shard I/N to only extract features")
    config = _check_run_options(opts)
    legend = _legend(opts)
    items = discover_images(dataset, opts["split"])
    _protect_inputs(dataset, items, opts, {"--masks": masks}, model_out=out)
    _check_remote_outputs(opts["overlay"], None if out is None else out.parent)
    if out is not None:  # a folder, a path under a file or a user's other file: refused before the fit
        from segcli.method.model import check_model_out

        check_model_out(out)
    if masks is not None:
        from segcli.io.outputs import prepare_output_dir

        prepare_output_dir(masks)
    with _engine_session(opts):
        _cluster_dataset(config, reporter, opts, items, part, out, masks, started, legend, dataset)


def _cluster_dataset(config: SegmentConfig, reporter, opts: dict, items: list, part: tuple[int, int] | None,
                     out: Path | None, masks: Path | None, started: float, legend=None, dataset: Path | None = None) -> None:
    """cluster-dataset's work, inside its engine's session: extract a shard, or fit (and write masks)."""
    from rich.console import Console

    seg = _segmenter(config, reporter, opts)
    console = Console(stderr=True, highlight=False)
    if part is not None:
        i, n = part
        mine = items[i - 1:: n]
        summary = seg.extract(mine)
        console.print(f"cluster-dataset: shard {i}/{n}: features of {summary.written} of {len(mine)} images are in "
                      f"{seg.source.cache_root} ({len(summary.skipped)} skipped) in {time.perf_counter() - started:.1f} s")
        if summary.skipped:
            raise typer.Exit(EXIT_SKIPPED)
        return
    seg.fit(items)
    if out is not None:
        from segcli.io import storage

        path = seg.model_.save(out)
        console.print(f"cluster-dataset: model fitted on {len(items) - len(seg.skipped)} images saved to {path} "
                      f"({storage.size(path) / 1024:.0f} KiB)")
    if masks is not None:
        summary = seg.predict(items, masks, overlay_dir=opts["overlay"], resume=opts["resume"], legend=legend)
        _record("cluster-dataset", seg, dataset, items, masks, opts, summary, out, started, legend)
        _finish("cluster-dataset", summary, masks, started)
    elif seg.skipped:
        raise typer.Exit(EXIT_SKIPPED)


def _parse_shard(text: str) -> tuple[int, int]:
    from segcli.errors import UsageError

    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like I/N (e.g. 2/8), got {text!r}") from None
    if not (n >= 1 and 1 <= i <= n):
        raise UsageError(f"--shard {text}: need 1 <= I <= N")
    return i, n


app.command("evaluate")(handle_errors(evaluate_command))


@app.command()
@handle_errors
def report(
    masks: Annotated[Path, typer.Argument(help="Mask folder written by segment --out (or cluster-dataset --masks); its segcli-run.json says how the run was made.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write (self-contained: pictures embedded, nothing fetched).")],
    evaluation: Annotated[Optional[Path], typer.Option("--eval", "-e", help="The --json file of `segcli evaluate MASKS GT`: per-image mIoU and pixel accuracy, ground truth pictures, per-class IoU, cluster-to-class matching, confusion matrix.")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Folder of the input images (default: the paths in the run record).")] = None,
    class_names: Annotated[Optional[str], typer.Option("--class-names", help="Names of the cluster ids when there is no --eval: a preset, a text file or an evaluate --json file (as for segment).")] = None,
    max_images: Annotated[int, typer.Option("--max-images", help="Images that get pictures (every image is listed): all when there are fewer; else half the worst-scored and the rest spread over the others by score.")] = 100,
    thumb_side: Annotated[int, typer.Option("--thumb-side", help="Long side of the pictures in pixels.")] = 240,
    title: Annotated[Optional[str], typer.Option("--title", help="Title of the page (default: the mask folder's name).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Write one self-contained HTML report of a run's masks (and of its evaluation with --eval)."""
    from segcli.errors import InputError, UsageError
    from segcli.html_report import build_report
    from segcli.evaluate.class_names import read_class_names
    from segcli.io.outputs import check_apart_from_inputs
    from segcli.report import RichReporter
    from segcli.io.run_record import read_run_record

    if not 0 <= max_images <= 100_000:
        raise UsageError(f"--max-images must be between 0 and 100000, got {max_images}")
    if not 16 <= thumb_side <= 2048:
        raise UsageError(f"--thumb-side must be between 16 and 2048, got {thumb_side}")
    if not masks.is_dir():
        raise InputError(f"mask folder {masks} not found (or not a folder)")
    if images is not None and not images.is_dir():
        raise InputError(f"--images {images} not found (or not a folder)")
    if evaluation is not None and not evaluation.is_file():
        raise InputError(f"--eval {evaluation} not found")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as {out / 'report.html'}")
    names = read_class_names(class_names) if class_names is not None else None
    record = read_run_record(masks)
    dirs = [masks] + ([images] if images is not None else [])
    files = [evaluation] if evaluation is not None else []
    if record is not None and record.get("images") and "://" not in str(record["images"]):
        source = Path(record["images"])
        (files if source.is_file() else dirs).append(source)  # an image folder, or a list file
    if evaluation is not None:
        import json

        try:
            gt_dir = json.loads(evaluation.read_text(encoding="utf-8")).get("gt_dir")
        except (OSError, ValueError, AttributeError):
            gt_dir = None  # build_report says what is wrong with the file
        if gt_dir and "://" not in str(gt_dir):
            dirs.append(Path(gt_dir))
    check_apart_from_inputs({}, [d for d in dirs if d.is_dir()], files, {"--out": out})
    reporter = RichReporter(quiet)
    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            for ctx in bars.values():
                ctx[0].__exit__(None, None, None)
            ctx = reporter.progress(stage, total)
            bars.clear()
            bars[stage] = (ctx, ctx.__enter__())
        bars[stage][1](1)

    started = time.perf_counter()
    try:
        stats = build_report(masks, out, evaluation, images, names, max_images, thumb_side, title, progress)
    finally:
        for ctx in bars.values():
            ctx[0].__exit__(None, None, None)
    from rich.console import Console

    Console(stderr=True, highlight=False).print(
        f"report: wrote {out} ({stats.bytes / 1e6:.1f} MB; {stats.images} images, {stats.pictured} with pictures) "
        f"in {time.perf_counter() - started:.1f} s", soft_wrap=True, markup=False)


def main() -> None:
    """The ``segcli`` entry point: click's own usage errors (a value that is not a number, an unknown option, a
    missing argument) become one ``segcli: error:`` line with exit 2, like every other error."""
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="segcli", standalone_mode=False)
    except Exception as exc:  # noqa: BLE001 - typer ships its own copy of click: match its errors by shape
        kind = type(exc).__name__
        if kind == "NoArgsIsHelpError":  # a bare `segcli`: the help was shown, exit as click does
            sys.exit(getattr(exc, "exit_code", 2))
        if kind == "Abort":
            _err("aborted")
            sys.exit(EXIT_INTERRUPTED)
        if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
            raise
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None and kind != "ClickException" else ""
        _err(" ".join(exc.format_message().split()) + where)
        sys.exit(exc.exit_code)
    code = code if isinstance(code, int) else 0
    if code == EXIT_INTERRUPTED and not FINISHED["done"]:
        # Ctrl-C while click was still parsing (typer turns it into exit 130 silently): say it like every run.
        _err("interrupted; finished files are kept: run the same command again to resume")
    sys.exit(code)
