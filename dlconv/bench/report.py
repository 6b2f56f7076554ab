"""What a run writes: the result record (:func:`new_result`, schema :data:`SCHEMA`), the
text and Markdown tables, the bar chart of ratios to the built-in, and
:func:`write_outputs` (JSON, Markdown, PNG, roofline PNG)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import pathlib
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np

from .cases import TOLERANCE
from .roofline import ensure_roof, roof_lines, write_roofline

SCHEMA = "dlconv-bench/1"


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "—"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def _fmt_ratio(r: Optional[float]) -> str:
    return "—" if r is None else f"{r:.2f}×"


def _met(met) -> str:
    return "(not measured)" if met is None else ("met ✓" if met else "not met ✗")


def _mark(ok) -> str:
    return "—" if ok is None else ("✓" if ok else "✗")


def table_rows(result: dict) -> List[List[str]]:
    """Rows of the main table: layer, pass, device, impl, median, GFLOP/s, ratio, correct, target."""
    out = []
    batch = result.get("settings", {}).get("batch")
    for r in result["rows"]:
        status = r["status"]
        layer = r["layer"] if r.get("batch") in (None, batch) else f"{r['layer']} (b{r['batch']})"
        med = _fmt_time(r["median_s"]) if status == "ok" else status
        target = "" if r.get("target") is None else f"≥ {r['target']:g}× {_met(r['target_met'])}"
        note = "" if status == "ok" and not r.get("why") else (r.get("why") or "")
        out.append([layer, r["pass"], r["device"], r["impl"], med,
                    "—" if r["gflops"] is None else f"{r['gflops']:.1f}", _fmt_ratio(r["ratio"]),
                    _mark(r["correct"]), target, note])
    return out


def train_models(result: dict) -> List[str]:
    """The models with train-step rows, in order (rows without a model are the MNIST CNN's)."""
    return list(dict.fromkeys(r.get("layer", "mnist_cnn") for r in result.get("train_rows", [])))


def train_table_rows(result: dict, model: Optional[str] = None) -> List[List[str]]:
    """Rows of the train-step table of ``model`` (default: every row)."""
    out = []
    for r in result.get("train_rows", []):
        if model is not None and r.get("layer", "mnist_cnn") != model:
            continue
        target = "" if r.get("target") is None else f"≤ {r['target']:g}× {_met(r['target_met'])}"
        med = _fmt_time(r["median_s"]) if r["status"] == "ok" else r["status"]
        note = "; ".join(n for n in (r.get("why"), r.get("note")) if n)
        if r.get("vs_tensorflow") is not None:
            note = f"{r['vs_tensorflow']:.2f}× dlconv's own step on TensorFlow" + (f"; {note}" if note else "")
        out.append([r["impl"], med, _fmt_ratio(r.get("time_ratio")), _mark(r.get("correct")),
                    target, note])
    return out


def overhead_table_rows(result: dict) -> List[List[str]]:
    out = []
    for r in result.get("overhead_rows", []):
        if r["status"] != "ok":
            out.append([r["keras_backend"], r["status"], "", "", r.get("why") or ""])
            continue
        out.append([r["keras_backend"], _fmt_time(r["dlconv_s"]), _fmt_time(r["stock_s"]),
                    f"{r['ratio']:.2f}×", f"backend {r['backend']}"])
    return out


KERNEL_HEADER = ["layer", "pass", "device", "backend/variant", "median", "GFLOP/s",
                 "ratio vs built-in", "correct", "target", "note"]
#: The kernel table's legend for the target column (printed when the rows say which is default).
TARGET_LEGEND = ("target: judged on the dispatch default of each (layer, pass, backend), the variant a "
                 "user gets without asking for one; the other variants are listed without a target")
TRAIN_HEADER = ["MNIST CNN train step", "median", "time ratio ours/stock (≤1 good)", "correct",
                "target", "note"]
#: Titles of the train-step models (first column of their tables).
TRAIN_TITLES = {"mnist_cnn": "MNIST CNN", "resnet_ecal": "ECAL ResNet"}


def _train_tables(result: dict, table) -> List[str]:
    """One train-step table per model: ``table(header, rows)`` each, a blank line before."""
    parts = []
    for model in train_models(result):
        rows = train_table_rows(result, model)
        batch = next((r.get("batch") for r in result["train_rows"]
                      if r.get("layer", "mnist_cnn") == model and r.get("batch")), None)
        title = f"{TRAIN_TITLES.get(model, model)} train step"
        if model != "mnist_cnn" and batch:
            title += f" (batch {batch})"
        parts += ["", table([title] + TRAIN_HEADER[1:], rows)]
    return parts


def _batch_text(result: dict) -> str:
    s = result["settings"]
    if result.get("suite", "mnist") == "mnist" or s.get("batch_fixed"):
        return f"batch {s['batch']}"
    return f"batch {s['batch']} unless the layer says (bN: the layer's own batch)"
OVERHEAD_HEADER = ["bridge per-call overhead (1×1 conv, 1×1×1×1)", "dlconv", "stock op",
                   "time ratio", "note"]


def _text_table(header, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    widths[-1] = min(widths[-1], 60)
    line = lambda cells: "  ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _md_table(header, rows) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _targets_rows(result: dict) -> List[List[str]]:
    out = []
    for t in result.get("targets", []):
        value = "—" if t["value"] is None else f"{t['value']:.2f}×"
        mark = "not measured" if t["met"] is None else ("met ✓" if t["met"] else "not met ✗")
        out.append([t["label"], t["target"], t["best_impl"] or "—", value, mark, t.get("why") or ""])
    return out


TARGETS_HEADER = ["target", "goal", "default path", "measured", "", "note"]
#: The same for results written before rows marked their default (judged on the best variant).
TARGETS_HEADER_BEST = ["target", "goal", "best", "measured", "", "note"]


def _targets_header(result: dict) -> List[str]:
    return TARGETS_HEADER if _has_default(result) else TARGETS_HEADER_BEST


def format_text(result: dict) -> str:
    m = result["machine"]
    parts = [f"dlconv bench — {result['date']} — {m['description']}",
             f"{_batch_text(result)}, median of {result['settings']['repeats']} samples "
             f"after warm-up; ratio = t_built-in / t_ours (> 1: ours faster); built-in: "
             f"{result['builtin']}; correctness vs dlconv.reference (max rel. error ≤ {TOLERANCE:g})",
             "", _text_table(KERNEL_HEADER, table_rows(result))]
    if _has_default(result):
        parts += [TARGET_LEGEND]
    if result.get("train_rows"):
        parts += _train_tables(result, _text_table)
    if result.get("inference_rows"):
        from .inference import table_text
        parts += table_text(result["inference_rows"], _text_table)
    if result.get("overhead_rows"):
        parts += ["", _text_table(OVERHEAD_HEADER, overhead_table_rows(result))]
    if result.get("targets"):
        parts += ["", "targets:", _text_table(_targets_header(result), _targets_rows(result))]
    failed = user_failures(result)
    if failed:
        parts += ["", "your kernels that failed their check (not timed):"] + [f"  {f}" for f in failed]
    roof = roof_lines(result)
    if roof:
        parts += [""] + roof
    return "\n".join(parts)


def _has_default(result: dict) -> bool:
    """Whether the rows mark their default variant (results before that field do not)."""
    return any("default" in r for r in result.get("rows", []))


def user_failures(result: dict) -> List[str]:
    """One line per failed user-kernel row, in full (the table's note column is cut)."""
    return [f"{r['impl']} on {r['layer']} {r['pass']} [{r['device']}]: {r['why']}"
            for r in result.get("rows", []) if r.get("backend") == "user"
            and r.get("status") in ("failed", "error")]


def format_markdown(result: dict, title: Optional[str] = None) -> str:
    m = result["machine"]
    s = result["settings"]
    parts = [f"### {title or 'dlconv bench'} — {result['kind']} — {result['date']}", "",
             f"Machine: {m['description']}", "",
             f"B{_batch_text(result)[1:]}; median of {s['repeats']} timed samples after warm-up; "
             f"ratio = t_built-in / t_ours (> 1 means dlconv is faster); built-in: "
             f"{result['builtin']}, measured in the same process; correct = max relative error "
             f"against dlconv.reference ≤ {TOLERANCE:g} on the same inputs.", ""]
    if result.get("notes") or roof_lines(result):
        parts += [f"- {n}" for n in result.get("notes", []) + roof_lines(result)] + [""]
    parts += [_md_table(KERNEL_HEADER, table_rows(result))]
    if _has_default(result):
        parts += ["", TARGET_LEGEND + "."]
    if result.get("train_rows"):
        parts += _train_tables(result, _md_table)
    if result.get("inference_rows"):
        from .inference import table_text
        parts += table_text(result["inference_rows"], _md_table)
    if result.get("overhead_rows"):
        parts += ["", _md_table(OVERHEAD_HEADER, overhead_table_rows(result))]
    if result.get("targets"):
        parts += ["", _md_table(_targets_header(result), _targets_rows(result))]
    return "\n".join(parts) + "\n"


def write_chart(result: dict, path) -> pathlib.Path:
    """Horizontal bars: ratio to the built-in per layer/pass/impl (log scale, 1 = built-in)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not r["is_builtin"]]
    # train rows: the TensorFlow ones name their model and device; the Keras-backend ones
    # (keras_backends.py, one child process per backend) name their backend instead.
    rows += [dict(r, layer="train", pass_="step", device=r.get("device") or r.get("keras_backend", "cpu"),
                  impl=f"{r['impl']} ({r['layer']})" if r.get("layer") else r["impl"],
                  ratio=(1.0 / r["time_ratio"]) if r.get("time_ratio") else None)
             for r in result.get("train_rows", []) if r["backend"] != "builtin"]
    labels, values, colors = [], [], []
    palette = {"cpp": "#1f77b4", "numba": "#ff7f0e", "user": "#2ca02c"}
    for r in rows:
        p = r.get("pass_") or r.get("pass", "")
        labels.append(f"{r['layer']} {p} [{r['device']}] {r['impl']}")
        values.append(r["ratio"] if r.get("ratio") else 0.0)
        colors.append(palette.get(r["backend"], "#7f7f7f") if r.get("ratio") else "#d62728")
    fig_h = max(2.5, 0.28 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(10, fig_h))
    ypos = np.arange(len(rows))[::-1]
    marks = [v for v in values if v > 0] + [r["target"] for r in rows if r.get("target")] + [1.0]
    lo, hi = min(marks) / 3.0, max(marks) * 3.0
    for y, r, v, c in zip(ypos, rows, values, colors):
        if v > 0:
            ax.barh(y, v - lo, left=lo, color=c)
            ax.text(v * 1.05, y, f"{v:.2f}×", va="center", fontsize=7)
        else:
            ax.text(lo * 1.1, y, f"{r.get('status') or 'n/a'} (not timed)", va="center",
                    fontsize=7, color="#d62728")
        t = r.get("target")
        if t is not None and r["layer"] != "train":
            ax.plot([t, t], [y - 0.4, y + 0.4], color="k", lw=1.2)
    ax.set_xlim(lo, hi)
    ax.axvline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("speed relative to the built-in (t_built-in / t_ours; train step: t_stock / t_ours); "
                  "black tick = target; red = failed/not timed", fontsize=8)
    ax.set_title(f"dlconv bench, {result['kind']}, {result['date']}\n{result['machine']['description'][:150]}",
                 fontsize=8)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def writable_folder(out_dir) -> Tuple[pathlib.Path, str]:
    """(the folder results go to, a note) — ``out_dir`` when it can be created and written,
    else a fresh temporary folder, named in the note.  Checked before the run, so a finished
    run is never lost to an unwritable --out."""
    out_dir = pathlib.Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".dlconv-write-check-"):
            pass
        return out_dir, ""
    except OSError as exc:
        fallback = pathlib.Path(tempfile.mkdtemp(prefix="dlconv-bench-"))
        return fallback, (f"cannot write to --out {out_dir} ({exc.strerror or exc}); "
                          f"writing the results to {fallback} instead")


def write_outputs(result: dict, out_dir, name: str) -> Dict[str, pathlib.Path]:
    """NAME.json (the record, first), NAME.md, NAME.png (ratios to the built-in) and
    NAME-roofline.png; the roof of each device with timed rows is measured now if ``result``
    does not carry it yet.  A folder that stopped being writable falls back as
    :func:`writable_folder` does; a chart that cannot be drawn is reported without losing the
    JSON and the table."""
    out_dir, note = writable_folder(out_dir)
    if note:
        print(f"dlconv bench: {note}", file=sys.stderr)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md",
             "png": out_dir / f"{name}.png", "roofline": out_dir / f"{name}-roofline.png"}
    try:
        ensure_roof(result)
    except Exception as exc:  # the roof is a measurement: its failure must not lose the run
        print(f"dlconv bench: the roofline's roof was not measured ({type(exc).__name__}: {exc})",
              file=sys.stderr)
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(format_markdown(result))
    for key, draw in (("png", write_chart), ("roofline", write_roofline)):
        try:
            draw(result, paths[key])
        except (OSError, ImportError, ValueError, MemoryError, KeyError, TypeError) as exc:
            print(f"dlconv bench: the chart {paths[key]} was not written ({exc})", file=sys.stderr)
    return paths


def new_result(kind: str, machine: dict, settings, builtin_label: str, **extra) -> dict:
    now = _dt.datetime.now().astimezone()
    return {"schema": SCHEMA, "kind": kind, "date": now.strftime("%Y-%m-%d"),
            "timestamp": now.isoformat(timespec="seconds"), "machine": machine,
            "settings": dataclasses.asdict(settings), "builtin": builtin_label,
            "tolerance": TOLERANCE, "rows": [], "train_rows": [], "overhead_rows": [], "targets": [],
            "notes": [], **extra}



def progress_bar(total: int, enabled: bool):
    """A tqdm bar on stderr when enabled and installed, else an object that ignores calls."""
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
        except ImportError:
            pass

    class _Null:
        def update(self, n=1):
            pass

        def set_description(self, s):
            pass

        def close(self):
            pass
    return _Null()
