"""The `evaluate` Typer command: options, terminal report, --json, --plot, --remap-out, errors, import cost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from segcli.errors import EXIT_INPUT, EXIT_USAGE, SegcliError
from segcli.evaluate.command import evaluate_command

app = typer.Typer()
app.command("evaluate")(evaluate_command)


@app.command("noop", hidden=True)
def _noop() -> None:  # a second command keeps "evaluate" as a sub-command, as in segcli's app
    pass


def invoke(*args: str):
    """Run the command as segcli's CLI wrapper does: a SegcliError becomes one line and its exit code."""
    result = CliRunner().invoke(app, ["evaluate", *args])
    if isinstance(result.exception, SegcliError):
        return result.exception.exit_code, str(result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def put(path: Path, arr) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


@pytest.fixture
def data(tmp_path):
    gt = np.array([[0, 0, 0, 0, 0, 0, 0, 1, 1]])
    pred = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    put(tmp_path / "gt" / "a.png", gt)
    put(tmp_path / "pred" / "a.png", pred + 4)  # cluster ids 4 and 5
    put(tmp_path / "gt" / "b.png", [[1, 1, 255]])
    put(tmp_path / "pred" / "b.png", [[5, 5, 4]])
    return tmp_path


def test_help_lists_every_option():
    code, out = invoke("--help")
    assert code == 0
    for opt in ("--preset", "--num-classes", "--ignore", "--palette", "--split", "--protocol", "--matching",
                "--num-clusters", "--per-image", "--allow-missing", "--strict-size", "--workers", "--json",
                "--plot", "--remap-out"):  # fmt: skip
        assert opt in out, opt


def test_report_json_plot_and_remap(data):
    out_json = data / "out" / "scores.json"
    plot = data / "out" / "cm.png"
    remap = data / "out" / "remap"
    code, out = invoke(str(data / "pred"), str(data / "gt"), "--num-classes", "2", "-j", "1",
                       "--json", str(out_json), "--plot", str(plot), "--remap-out", str(remap))  # fmt: skip
    assert code == 0, out
    assert "matching: Hungarian (2 predicted ids = 2 classes)" in out
    # id 4: 4 px of class 0; id 5: 3 px class 0 + 4 px class 1  ->  IoU 4/7 and 4/7, accuracy 8/11
    assert "mIoU 57.14 %" in out and "pixel accuracy 72.73 %" in out
    data_json = json.loads(out_json.read_text())
    assert data_json["mapping"] == {"4": 0, "5": 1} and data_json["matching"] == "hungarian"
    assert data_json["miou"] == pytest.approx(4 / 7, abs=1e-12)
    assert data_json["per_class"][1]["iou"] == pytest.approx(4 / 7, abs=1e-12)
    assert data_json["confusion"]["counts"] == [[4, 0], [3, 4]] and data_json["ignored_pixels"] == 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    remapped = Image.open(remap / "b.png")
    assert remapped.mode == "P" and np.asarray(remapped).tolist() == [[1, 1, 0]]
    assert np.asarray(Image.open(remap / "a.png")).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1]]


def test_json_to_stdout_and_per_image_mode(data):
    code, out = invoke(str(data / "pred"), str(data / "gt"), "--num-classes", "2", "--per-image", "--json", "-")
    assert code == 0
    parsed = json.loads(out[out.index("{"):])
    assert parsed["mode"] == "per-image" and [r["name"] for r in parsed["per_image"]] == ["a", "b"]


def test_majority_is_announced(data):
    put(data / "pred" / "b.png", [[6, 6, 4]])  # three ids for two classes
    code, out = invoke(str(data / "pred"), str(data / "gt"), "--num-classes", "2")
    assert code == 0 and "matching: many-to-one majority (3 predicted ids > 2 classes)" in out


def test_errors_are_one_line_with_exit_codes(data):
    (data / "gt" / "b.png").unlink()
    code, msg = invoke(str(data / "pred"), str(data / "gt"), "--num-classes", "2")
    assert code == EXIT_INPUT and "1 predictions have no ground truth (b)" in msg and "\n" not in msg
    code, out = invoke(str(data / "pred"), str(data / "gt"), "--num-classes", "2", "--allow-missing")
    assert code == 0 and "scored 1 of 1 ground-truth images" in out
    code, msg = invoke(str(data / "pred"), str(data / "gt"))
    assert code == EXIT_USAGE and "--num-classes" in msg
    code, msg = invoke(str(data / "pred"), str(data / "gt"), "--num-classes", "2", "--workers", "0")
    assert code == EXIT_USAGE
    code, _ = invoke(str(data / "pred"), str(data / "gt"), "--preset", "ade20k")
    assert code == 2  # click's own usage error for a bad choice


def test_importing_the_command_stays_light():
    code = (
        "import sys; import segcli.evaluate.command, segcli.evaluate; "
        "heavy = [m for m in ('numpy', 'scipy', 'PIL', 'matplotlib', 'rich.console') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
