"""``segcli report``: one self-contained HTML page of a run (and of its evaluation).

The page holds everything it shows: pictures are reduced JPEGs embedded as ``data:`` URIs, the styles and the
script are inline, and a Content-Security-Policy forbids every fetch (no network, no CDN): it opens from disk
in any browser. Every text that comes from files (names, paths, reasons, class names) is HTML-escaped, or put
in the page's JSON data with ``<``, ``>`` and ``&`` escaped and shown by the script as text, never as markup.

Bounded: the table lists every image (about 100 bytes each) and pages through it 50 rows at a time; only
``--max-images`` images (default :data:`DEFAULT_MAX_IMAGES`) get pictures, chosen by
:func:`segcli.html_report_data.sample_rows` (half the worst, the rest spread over the others). Images are read
one at a time, never all at once. The data module is :mod:`segcli.html_report_data`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segcli import __version__
from segcli.errors import OutputError
from segcli.html_report_data import (
    UNMATCHED_COLOUR,
    Evaluation,
    ImageRow,
    class_colours,
    gather_rows,
    gt_spec,
    load_evaluation,
    pair_ground_truth,
    read_pair,
    sample_rows,
    score_row,
)

DEFAULT_MAX_IMAGES = 100
DEFAULT_THUMB_SIDE = 240
JPEG_QUALITY = 72
PAGE_ROWS = 50


@dataclass
class ReportStats:
    """What a build did: rows in the table, rows with pictures, the file's size and the seconds it took."""

    images: int
    pictured: int
    bytes: int
    seconds: float
    notes: list[str]


def _jpeg_uri(img) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumb_size(h: int, w: int, side: int) -> tuple[int, int]:
    s = min(1.0, side / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def _pictures(row: ImageRow, spec, evaluation: Evaluation | None, side: int, colours: np.ndarray | None) -> dict:
    """The row's reduced input, prediction overlay and ground-truth overlay as data URIs (absent ones: None).

    The prediction is coloured with the label PNGs' palette; the ground truth with :func:`class_colours` (the
    colour of the cluster matched to each class), its ignored pixels left uncoloured."""
    from PIL import Image

    from segcli.evaluate.labels import label_array, open_label, prediction_ids
    from segcli.io.images import load_image
    from segcli.io.outputs import PALETTE_RGB, overlay_image
    from segcli.method.steps import resize_labels

    if row.gt is not None and evaluation is not None:
        pred, codes = read_pair(row, spec)
    else:
        pred = prediction_ids(label_array(open_label(row.mask, "prediction"), row.mask, "prediction"), row.mask)
        codes = None
    h, w = _thumb_size(*pred.shape, side)
    rgb = None
    out = {"i": None, "o": None, "g": None}
    if row.image is not None:
        try:
            rgb = load_image(Path(row.image), max(side, 1)).rgb
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
            out["i"] = _jpeg_uri(Image.fromarray(rgb))
        except Exception as exc:  # noqa: BLE001 - a bad input image loses its picture, not the report
            row.notes.append(f"input image unreadable: {exc}")
            rgb = None
    base = rgb if rgb is not None else np.full((h, w, 3), 40, np.uint8)
    out["o"] = _jpeg_uri(overlay_image(base, resize_labels(pred, (h, w))))
    if codes is not None:
        small = resize_labels(codes, (h, w)).astype(np.int64)
        table = np.zeros((256, 3), np.uint8)
        if row.mapping is not None:  # per-image matching: this image's own class colours
            counts = {int(i): 1 for i in row.pred_ids}
            per = class_colours(row.mapping, counts, spec.num_classes, PALETTE_RGB)
        else:
            per = colours
        n = min(spec.num_classes, 255)
        table[:n] = per[:n]
        # Ignored pixels, classes past 254 and classes matched to cluster 0 (left as they are in the prediction's
        # overlay, like every id 0) stay uncoloured.
        plain = np.append((per[:n] == PALETTE_RGB[0]).all(axis=1) & (per[:n] != UNMATCHED_COLOUR).any(axis=1),
                          np.ones(max(0, int(small.max()) + 1 - n), bool))
        shown = np.where(plain[small], 255, small).astype(np.uint8)
        out["g"] = _jpeg_uri(overlay_image(base, shown, colours=table, skip=255))
    return out


def _esc(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _json_script(data) -> str:
    """JSON for a ``<script type="application/json">`` block: no ``</script>``, ``<!--`` or entity can form."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _pct(x) -> str:
    return "—" if x is None else f"{100 * float(x):.2f} %"


def _kv_table(pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs if v not in (None, "", {}, []))
    return f"<table class='kv'>{rows}</table>"


def _swatch(colour) -> str:
    r, g, b = (int(v) for v in colour)
    return f"<span class='sw' style='background:rgb({r},{g},{b})'></span>"


def _run_section(record: dict | None, masks_dir: Path) -> str:
    if record is None:
        return (f"<p class='note'>No run record (segcli-run.json) in {_esc(masks_dir)}: the settings, model and "
                "timings of the run are unknown (masks from another tool or an older segcli).</p>")
    settings = ", ".join(f"{k}={v}" for k, v in (record.get("settings") or {}).items())
    runtime = ", ".join(f"{k}={v}" for k, v in (record.get("runtime") or {}).items())
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in (record.get("timings") or {}).items() if isinstance(v, (int, float)))
    pairs = [
        ("segcli", record.get("tool")), ("command", record.get("command")), ("finished", record.get("finished")),
        ("images", record.get("images")), ("masks", record.get("out")), ("model file", record.get("model_file")),
        ("model digest", record.get("model_digest")), ("backbone", record.get("backbone")),
        ("weights", record.get("weights") or "timm's pretrained weights"), ("weights identity", record.get("weights_id")),
        ("features", record.get("features")), ("device", record.get("device_used")),
        ("masks written / kept / skipped",
         f"{record.get('written')} / {record.get('reused')} / {len(record.get('skipped') or {})}"),
        ("run time", f"{record.get('seconds')} s"), ("stage times", timings), ("method settings", settings),
        ("run-time options", runtime),
    ]
    return _kv_table(pairs)


def _evaluation_section(ev: Evaluation, colours: np.ndarray) -> str:
    from segcli.io.outputs import PALETTE_RGB

    d = ev.data
    head = _kv_table([
        ("evaluated by", d.get("tool")), ("ground truth", d.get("gt_dir")), ("predictions", d.get("pred_dir")),
        ("preset", d.get("preset")), ("protocol", d.get("protocol")), ("matching", d.get("matching_note")),
        ("images scored", d.get("images")), ("mIoU", _pct(d.get("miou"))),
        ("pixel accuracy", _pct(d.get("pixel_accuracy"))), ("evaluation time", f"{d.get('seconds')} s"),
    ])
    names = ev.class_names
    C = ev.num_classes
    # Which clusters went to which class, and how many pixels (dataset mode: rows of the confusion matrix).
    clusters: dict[int, list[tuple[int, int, int]]] = {}
    cluster_rows = []
    conf = (d.get("confusion") or {}).get("counts") or []
    pred_ids = d.get("pred_ids") or []
    for pid, counts in zip(pred_ids, conf):
        cls = ev.mapping.get(int(pid))
        total = int(sum(counts))
        right = int(counts[cls]) if cls is not None and cls < len(counts) else 0
        clusters.setdefault(cls if cls is not None else -1, []).append((int(pid), total, right))
        colour = PALETTE_RGB[int(pid)] if 0 <= int(pid) < 256 else (0, 0, 0)
        cluster_rows.append(
            f"<tr><td>{_swatch(colour)} {int(pid)}</td><td>{_esc(names[cls] if cls is not None else 'unmatched')}</td>"
            f"<td class='num'>{total:,}</td><td class='num'>{(100 * right / total if total else 0):.1f} %</td></tr>")
    bars = []
    for c in d.get("per_class", []):
        i = int(c["id"])
        iou = c.get("iou")
        width = 0 if iou is None else max(0.0, min(100.0, 100 * float(iou)))
        went = ", ".join(f"{pid} ({total:,} px)" for pid, total, _ in clusters.get(i, [])) or "—"
        bars.append(
            f"<tr data-class='{i}'><td>{_swatch(colours[i]) if i < len(colours) else ''} {_esc(c.get('name'))}</td>"
            f"<td class='barcell'><div class='bar' style='width:{width:.1f}%'></div></td>"
            f"<td class='num'>{_pct(iou)}</td><td class='num'>{int(c.get('gt_pixels', 0)):,}</td><td>{_esc(went)}</td></tr>")
    per_class = ("<table class='classes'><thead><tr><th>class</th><th colspan='2'>IoU</th><th>GT pixels</th>"
                 f"<th>clusters matched to it (pixels)</th></tr></thead><tbody>{''.join(bars)}</tbody></table>")
    matching = ""
    if ev.mode == "per-image":
        matching = "<p class='note'>Per-image matching: every image's clusters were matched on their own (see each image's legend).</p>"
    elif cluster_rows:
        matching = ("<h3>Cluster-to-class matching</h3><table class='clusters'><thead><tr><th>cluster</th>"
                    "<th>matched class</th><th>pixels</th><th>of which that class</th></tr></thead>"
                    f"<tbody>{''.join(cluster_rows)}</tbody></table>")
    return (f"{head}<h3>IoU per class</h3>{per_class}{matching}<h3>Confusion matrix after matching</h3>"
            f"{_confusion_html(d, names, C)}")


def _confusion_html(d: dict, names: list[str], C: int) -> str:
    """The matched confusion matrix as a picture: a table whose cells are shaded by the share of each true
    class's pixels (rows: ground truth; columns: matched class, and unmatched)."""
    counts = np.asarray((d.get("matched_confusion") or {}).get("counts") or np.zeros((C + 1, C)), dtype=np.float64)
    if counts.shape != (C + 1, C):
        return "<p class='note'>confusion matrix missing or malformed</p>"
    share = counts.T  # (true C, matched C + 1)
    cols = list(names) + ["unmatched"]
    if share[:, C].sum() == 0:
        share, cols = share[:, :C], list(names)
    sums = share.sum(axis=1, keepdims=True)
    share = np.divide(share, sums, out=np.zeros_like(share), where=sums > 0)
    head = "".join(f"<th class='rot'><div>{_esc(n)}</div></th>" for n in cols)
    body = []
    for i in range(C):
        cells = []
        for j in range(len(cols)):
            v = share[i, j]
            text = f"{100 * v:.0f}" if v >= 0.01 else ""
            fg = "#fff" if v > 0.5 else "#000"
            cells.append(f"<td style='background:rgba(31,90,180,{v:.3f});color:{fg}' "
                         f"title='{_esc(names[i])} → {_esc(cols[j])}: {100 * v:.1f} %'>{text}</td>")
        body.append(f"<tr><th>{_esc(names[i])}</th>{''.join(cells)}</tr>")
    return (f"<table class='confusion'><thead><tr><th>true \\ matched</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table><p class='note'>Share of each true class's pixels (row) "
            "that went to each matched class (column), in percent.</p>")


def build_report(masks_dir: Path, out: Path, evaluation_path: Path | None = None, images_dir: Path | None = None,
                 class_names: dict[int, str] | None = None, max_images: int = DEFAULT_MAX_IMAGES,
                 thumb_side: int = DEFAULT_THUMB_SIDE, title: str | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> ReportStats:
    """Write the report of the masks in ``masks_dir`` (and of ``evaluation_path``, an ``evaluate --json``) to
    ``out`` atomically. ``class_names`` name cluster ids where no evaluation does. See the module docstring."""
    from segcli.io.outputs import PALETTE_RGB, atomic_write
    from segcli.io.run_record import read_run_record

    started = time.perf_counter()
    masks_dir = Path(masks_dir)
    record = read_run_record(masks_dir)
    evaluation = load_evaluation(evaluation_path) if evaluation_path is not None else None
    rows = gather_rows(masks_dir, record, images_dir)
    notes: list[str] = []
    if record is None and images_dir is None:
        notes.append("no run record (segcli-run.json) in the mask folder: pass --images DIR to show the input images")
    spec = None
    if evaluation is not None:
        spec = gt_spec(evaluation)
        notes += pair_ground_truth(rows, masks_dir, evaluation)
        pred_dir = evaluation.data.get("pred_dir")
        if pred_dir and "://" not in str(pred_dir) and Path(pred_dir).resolve() != masks_dir.resolve():
            notes.append(f"the evaluation scored {pred_dir}, not this mask folder: figures are paired by name")
    for n, row in enumerate(rows):
        score_row(row, evaluation, spec)
        if progress is not None:
            progress("scoring", n + 1, len(rows))

    names = dict(class_names or {})
    if record is not None and not names:
        names = {int(k): v for k, v in (record.get("class_names") or {}).items()}
    colours = None
    id_names: dict[int, str] = {k: str(v) for k, v in names.items()}
    if evaluation is not None:
        pixels: dict[int, int] = {}
        conf = (evaluation.data.get("confusion") or {}).get("counts") or []
        for pid, counts in zip(evaluation.data.get("pred_ids") or [], conf):
            pixels[int(pid)] = int(sum(counts))
        colours = class_colours(evaluation.mapping, pixels, evaluation.num_classes, PALETTE_RGB)
        for pid, cls in evaluation.mapping.items():
            id_names[pid] = evaluation.class_names[cls] if cls is not None else "unmatched"

    picked = sample_rows(rows, max_images)
    thumbs = []
    thumb_of: dict[int, int] = {}
    for n, i in enumerate(picked):
        row = rows[i]
        try:
            thumbs.append(_pictures(row, spec, evaluation, thumb_side, colours))
            thumb_of[i] = len(thumbs) - 1
        except Exception as exc:  # noqa: BLE001 - a file that changed since it was scored: note it, go on
            row.notes.append(f"pictures not made: {exc}")
        if progress is not None:
            progress("pictures", n + 1, len(picked))

    page = _page(rows, thumbs, thumb_of, record, evaluation, colours, id_names, notes, masks_dir, max_images,
                 thumb_side, title)
    data = page.encode("utf-8")
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder of {out}: {exc.strerror or exc}") from None
    atomic_write(Path(out), lambda f: f.write(data))
    return ReportStats(len(rows), len(thumbs), len(data), time.perf_counter() - started, notes)


def _page(rows, thumbs, thumb_of, record, evaluation, colours, id_names, notes, masks_dir, max_images,
          thumb_side, title) -> str:
    from segcli.io.outputs import PALETTE_RGB

    data = {
        "rows": [
            {"k": r.key, "s": r.status, "r": r.reason, "m": r.miou, "a": r.accuracy, "p": r.pred_ids,
             "g": r.gt_classes, "n": r.notes, "t": thumb_of.get(i, -1),
             "mp": None if r.mapping is None else {str(k): v for k, v in r.mapping.items()}}
            for i, r in enumerate(rows)
        ],
        "thumbs": thumbs,
        "palette": PALETTE_RGB.tolist(),
        "classNames": evaluation.class_names if evaluation is not None else [],
        "classColours": colours.tolist() if colours is not None else [],
        "idNames": {str(k): v for k, v in id_names.items()},
        "evaluated": evaluation is not None,
        "pageRows": PAGE_ROWS,
    }
    counts = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    heading = title or f"segcli report: {masks_dir.name or masks_dir}"
    summary = [f"{len(rows)} images", *(f"{n} {s}" for s, n in sorted(counts.items()) if s != "ok")]
    if evaluation is not None:
        summary.append(f"mIoU {_pct(evaluation.data.get('miou'))}")
        summary.append(f"pixel accuracy {_pct(evaluation.data.get('pixel_accuracy'))}")
    sample_text = (f"Pictures: {len(thumbs)} of {len(rows)} images (at most {max_images}, {thumb_side} px: "
                   "when there are more, half are the worst-scored and the rest are spread evenly over the others "
                   "by score; without scores, spread evenly by name). Every image is listed in the table.")
    class_options = "".join(f"<option value='g{c}'>class: {_esc(n)}</option>" for c, n in enumerate(
        evaluation.class_names if evaluation is not None else []))
    ids = sorted({i for r in rows for i in r.pred_ids})
    class_options += "".join(
        f"<option value='p{i}'>cluster {i}{(' (' + _esc(id_names[i]) + ')') if i in id_names else ''}</option>"
        for i in ids)
    ev_html = (_evaluation_section(evaluation, colours) if evaluation is not None
               else "<p class='note'>Not evaluated: run <code>segcli evaluate MASKS GT --json eval.json</code> and pass "
                    "<code>--eval eval.json</code> for per-image scores, per-class IoU and the confusion matrix.</p>")
    notes_html = "".join(f"<p class='note warn'>{_esc(n)}</p>" for n in notes)
    sep = " → " if evaluation is not None else " "
    legend = "".join(f"<span class='item'>{_swatch(PALETTE_RGB[i])} {i}{(sep + _esc(id_names[i])) if i in id_names else ''}</span>"
                     for i in ids)
    built = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    css = _CSS.replace("{side}", str(int(thumb_side)))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(heading)}</title>
<style>{css}</style></head>
<body>
<h1>{_esc(heading)}</h1>
<p class="summary" id="summary">{_esc(' · '.join(summary))}</p>
{notes_html}
<section><h2>Legend: cluster colours</h2><p class="legend" id="legend">{legend or '—'}</p>
<p class="note">The colours are those of the label PNGs' palette: the same id has the same colour in the masks,
the overlays and this page. Ground truth is drawn in the colour of the cluster matched to each class (grey: no cluster).</p></section>
<section><h2>Images</h2>
<p class="note">{_esc(sample_text)}</p>
<div class="controls">
<label>sort <select id="sort"><option value="miou">worst first</option><option value="-miou">best first</option>
<option value="name">name</option></select></label>
<label>show <select id="status"><option value="all">all images</option><option value="problems">skipped / unreadable / no prediction</option>
<option value="pictured">with pictures</option></select></label>
<label>with <select id="cls"><option value="">any class</option>{class_options}</select></label>
<label>name <input id="search" type="search" placeholder="filter by name"></label>
<span id="count"></span>
<button id="prev" type="button">&lsaquo; prev</button><span id="pageinfo"></span><button id="next" type="button">next &rsaquo;</button>
</div>
<table id="images"><thead><tr><th data-sort="name" class="sortable">image</th><th data-sort="miou" class="sortable">mIoU</th>
<th data-sort="acc" class="sortable">pixel acc.</th><th data-sort="status" class="sortable">status</th>
<th>input · prediction · ground truth</th></tr></thead><tbody id="rows"></tbody></table>
</section>
<section><h2>Evaluation</h2>{ev_html}</section>
<section><h2>How this run was made</h2>{_run_section(record, masks_dir)}</section>
<footer>Built {_esc(built)} by segcli {_esc(__version__)} (<code>segcli report</code>). Self-contained: nothing is fetched.</footer>
<script type="application/json" id="report-data">{_json_script(data)}</script>
<script>{_JS}</script>
</body></html>
"""


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:1.2em 2em;color:#222;background:#fafafa}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1.05em}.summary{font-size:1.1em;font-weight:600}.note{color:#555}.warn{color:#a40}
.sw{display:inline-block;width:.95em;height:.95em;border:1px solid #333;vertical-align:-.12em;margin-right:.15em}
.legend .item,.leg .item{display:inline-block;margin:0 .9em .2em 0;white-space:nowrap}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
table.kv th{background:#f0f0f0;font-weight:600;white-space:nowrap}table.kv td{font-family:ui-monospace,monospace;font-size:.9em;word-break:break-all}
.num{text-align:right;font-variant-numeric:tabular-nums}.barcell{width:220px}.bar{height:.9em;background:#3a7bd5}
th.sortable{cursor:pointer;user-select:none;background:#eef}th.sortable:hover{background:#dde}
th.asc::after{content:' \\25B2'}th.desc::after{content:' \\25BC'}
.controls{margin:.5em 0;display:flex;flex-wrap:wrap;gap:.8em;align-items:center}
#images td.pics img{height:auto;max-width:{side}px;margin-right:4px;border:1px solid #ccc;vertical-align:top}
.missing{display:inline-block;color:#888;font-style:italic;margin-right:1em}
.leg{font-size:.85em;margin-top:.2em}.reason{color:#a40}
table.confusion td{width:2.2em;height:1.6em;text-align:center;font-size:.75em;padding:0}
table.confusion th{font-size:.8em;font-weight:normal;white-space:nowrap}
th.rot{height:8em;vertical-align:bottom;padding:0}th.rot div{writing-mode:vertical-rl;transform:rotate(180deg);padding:.2em}
footer{margin-top:2em;color:#777;font-size:.85em}
"""

_JS = r"""
(function(){
'use strict';
const D = JSON.parse(document.getElementById('report-data').textContent);
const rows = D.rows.map((r, i) => Object.assign({i: i}, r));
const state = {sort: D.evaluated ? 'miou' : 'name', status: 'all', cls: '', q: '', page: 0};
const $ = id => document.getElementById(id);
if (!D.evaluated) { $('sort').value = 'name'; }
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined && text !== null) e.textContent = text; if (cls) e.className = cls; return e; }
function pct(x) { return (x === null || x === undefined) ? '—' : (100 * x).toFixed(2) + ' %'; }
function swatch(rgb) { const s = el('span', null, 'sw'); s.style.background = 'rgb(' + rgb[0] + ',' + rgb[1] + ',' + rgb[2] + ')'; return s; }
function idName(r, id) {
  if (r.mp) { const c = r.mp[String(id)]; return (c === null || c === undefined) ? 'unmatched' : D.classNames[c]; }
  const n = D.idNames[String(id)]; return n === undefined ? null : n;
}
function cmp(a, b) {
  const key = state.sort.replace('-', ''), dir = state.sort[0] === '-' ? -1 : 1;
  if (key === 'name') return dir * (a.k < b.k ? -1 : a.k > b.k ? 1 : 0);
  if (key === 'status') return dir * (a.s < b.s ? -1 : a.s > b.s ? 1 : 0) || (a.k < b.k ? -1 : 1);
  const va = key === 'acc' ? a.a : a.m, vb = key === 'acc' ? b.a : b.m;
  if (va === null && vb === null) return a.k < b.k ? -1 : 1;
  if (va === null) return 1;
  if (vb === null) return -1;
  return dir * (va - vb) || (a.k < b.k ? -1 : 1);
}
function keep(r) {
  if (state.status === 'problems' && r.s === 'ok') return false;
  if (state.status === 'pictured' && r.t < 0) return false;
  if (state.cls) {
    const n = Number(state.cls.slice(1));
    if (state.cls[0] === 'g' && r.g.indexOf(n) < 0) return false;
    if (state.cls[0] === 'p' && r.p.indexOf(n) < 0) return false;
  }
  if (state.q && r.k.toLowerCase().indexOf(state.q) < 0) return false;
  return true;
}
function legend(r) {
  const d = el('div', null, 'leg');
  r.p.forEach(id => { const s = el('span', null, 'item'); s.appendChild(swatch(D.palette[id] || [0,0,0]));
    const n = idName(r, id), sep = (D.evaluated || r.mp) ? ' \u2192 ' : ' ';
    s.appendChild(document.createTextNode(String(id) + (n ? sep + n : ''))); d.appendChild(s); });
  if (r.g.length) {
    d.appendChild(el('span', 'GT:', 'item'));
    r.g.forEach(c => { const s = el('span', null, 'item');
      let col = D.classColours[c] || [128,128,128];
      if (r.mp) { col = [128,128,128]; let best = null;
        Object.keys(r.mp).forEach(k => { if (r.mp[k] === c && (best === null || Number(k) < best)) best = Number(k); });
        if (best !== null) col = D.palette[best]; }
      s.appendChild(swatch(col)); s.appendChild(document.createTextNode(D.classNames[c])); d.appendChild(s); });
  }
  return d;
}
function picture(uri, what) {
  if (!uri) return el('span', what + ' missing', 'missing');
  const img = document.createElement('img'); img.src = uri; img.alt = what; return img;
}
function render() {
  document.querySelectorAll('th.sortable').forEach(th => {
    th.classList.remove('asc', 'desc');
    const key = state.sort.replace('-', '');
    if (th.dataset.sort === key) th.classList.add(state.sort[0] === '-' ? 'desc' : 'asc');
  });
  const shown = rows.filter(keep).sort(cmp);
  const pages = Math.max(1, Math.ceil(shown.length / D.pageRows));
  state.page = Math.min(state.page, pages - 1);
  $('count').textContent = shown.length + ' of ' + rows.length + ' images';
  $('pageinfo').textContent = ' page ' + (state.page + 1) + ' of ' + pages + ' ';
  $('prev').disabled = state.page === 0; $('next').disabled = state.page >= pages - 1;
  const body = $('rows'); body.textContent = '';
  shown.slice(state.page * D.pageRows, (state.page + 1) * D.pageRows).forEach(r => {
    const tr = document.createElement('tr'); tr.className = 'row'; tr.dataset.key = r.k;
    tr.dataset.miou = r.m === null ? '' : String(r.m);
    tr.appendChild(el('td', r.k, 'name'));
    tr.appendChild(el('td', pct(r.m), 'num miou')); tr.appendChild(el('td', pct(r.a), 'num acc'));
    const st = el('td', r.s, 'status');
    if (r.r) { st.appendChild(document.createElement('br')); st.appendChild(el('span', r.r, 'reason')); }
    r.n.forEach(n => { st.appendChild(document.createElement('br')); st.appendChild(el('span', n, 'reason')); });
    tr.appendChild(st);
    const pics = el('td', null, 'pics');
    if (r.t >= 0) { const t = D.thumbs[r.t]; pics.appendChild(picture(t.i, 'input')); pics.appendChild(picture(t.o, 'prediction'));
      if (D.evaluated) pics.appendChild(picture(t.g, 'ground truth')); }
    else if (r.s === 'ok') { pics.appendChild(el('span', 'not in the picture sample', 'missing')); }
    if (r.p.length || r.g.length) pics.appendChild(legend(r));
    tr.appendChild(pics);
    body.appendChild(tr);
  });
}
document.querySelectorAll('th.sortable').forEach(th => th.addEventListener('click', () => {
  const key = th.dataset.sort;
  state.sort = state.sort === key ? '-' + key : key;
  const opt = Array.from($('sort').options).find(o => o.value === state.sort);
  if (opt) $('sort').value = state.sort;
  state.page = 0; render();
}));
$('sort').addEventListener('change', e => { state.sort = e.target.value; state.page = 0; render(); });
$('status').addEventListener('change', e => { state.status = e.target.value; state.page = 0; render(); });
$('cls').addEventListener('change', e => { state.cls = e.target.value; state.page = 0; render(); });
$('search').addEventListener('input', e => { state.q = e.target.value.toLowerCase(); state.page = 0; render(); });
$('prev').addEventListener('click', () => { state.page = Math.max(0, state.page - 1); render(); });
$('next').addEventListener('click', () => { state.page += 1; render(); });
render();
})();
"""
