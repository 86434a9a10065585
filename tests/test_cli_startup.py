"""`segcli --help` must be instant: the CLI module may not import torch, timm, numpy or the stages; optional engines
(Ray) are imported only when chosen."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_import_is_light():
    code = ("import sys, segcli.cli; heavy = [m for m in ('torch', 'timm', 'numpy', 'scipy', 'sklearn', 'PIL', "
            "'segcli.pipeline', 'segcli.vit.backbone', 'fsspec', 's3fs', 'gcsfs', 'botocore', 'ray') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"imported at start-up: {out}"


def test_help_and_version():
    for args in (["--help"], ["segment", "--help"], ["cluster-dataset", "--help"], ["evaluate", "--help"]):
        r = subprocess.run([sys.executable, "-m", "segcli", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "Usage" in r.stdout
    r = subprocess.run([sys.executable, "-m", "segcli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("segcli ")


def test_local_engine_never_imports_ray(tmp_path):
    """A whole local run (the default --engine local) imports neither ray nor the Ray engine."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from tests.synthetic import make_dataset
from segcli.cli import main
from pathlib import Path
make_dataset(Path({str(tmp_path)!r}), n_images=3)
sys.argv = ["segcli", "segment", {str(tmp_path / "images")!r}, "--features", {str(tmp_path / "features")!r},
            "--out", {str(tmp_path / "masks")!r}, "--cache", {str(tmp_path / "cache")!r}, "--k", "3",
            "--assign", "pooled", "--quiet"]
try:
    main()
except SystemExit as exc:
    assert exc.code == 0, exc.code
print("imported:" + ",".join(m for m in ("ray", "segcli.engines.ray", "segcli.engines.ray_cluster") if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "imported:", f"the local engine imported: {r.stdout}"
    assert len(list((tmp_path / "masks").rglob("*.png"))) == 3
