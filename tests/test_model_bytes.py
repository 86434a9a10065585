"""The same fitted model always serialises to the same bytes, in any process (safetensors alone writes its JSON
header in a per-process random order): what lets two engines, or two runs, write identical model files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.synthetic import make_dataset
from tests.cli_helpers import cli, ok

ROOT = Path(__file__).resolve().parents[1]


def test_model_file_bytes_do_not_depend_on_the_process(tmp_path):
    make_dataset(tmp_path, n_images=4)
    ok(cli("cluster-dataset", tmp_path / "images", "--features", tmp_path / "features", "--out", tmp_path / "m.segcli",
           "--k", 3, "--assign", "pooled", "--cache", tmp_path / "cache", "--quiet"))
    code = ("import sys; from segcli.method.model import SegModel; "
            f"sys.stdout.buffer.write(SegModel.load({str(tmp_path / 'm.segcli')!r}).to_bytes())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, check=True).stdout
            for _ in range(4)}
    assert len(outs) == 1 and outs == {(tmp_path / "m.segcli").read_bytes()}
