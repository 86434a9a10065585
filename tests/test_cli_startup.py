"""`segcli --help` must be instant: the CLI module may not import torch, timm, numpy or the stages."""

import subprocess
import sys


def test_cli_import_is_light():
    code = ("import sys, segcli.cli; heavy = [m for m in ('torch', 'timm', 'numpy', 'scipy', 'sklearn', 'PIL', "
            "'segcli.pipeline', 'segcli.backbone', 'fsspec', 's3fs', 'gcsfs', 'botocore') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"imported at start-up: {out}"


def test_help_and_version():
    for args in (["--help"], ["segment", "--help"], ["cluster-dataset", "--help"], ["evaluate", "--help"]):
        r = subprocess.run([sys.executable, "-m", "segcli", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "Usage" in r.stdout
    r = subprocess.run([sys.executable, "-m", "segcli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("segcli ")
