"""Render the latest benchmark results in benchmarks/results/ as a markdown table for the README.

    python benchmarks/make_table.py                 # compact: best variant per backend
    python benchmarks/make_table.py --full          # every variant, as `dlconv bench` wrote it
    python benchmarks/make_table.py --results DIR

Reads the JSON files written by ``dlconv bench`` (kind "cpu", or "gpu" when dlconv bench ran
on a GPU machine) and ``benchmarks/gpu_bench.py`` (kind "gpu"); dry runs are ignored.  For
each kind the newest full run of the default MNIST suite is used (a --quick run only when no
full run exists); after them, the newest CPU run of the shape suite (``dlconv bench --suite
ecal`` or ``all``), when there is one.  Every number printed comes from those files; a kind
with no file says "not yet measured".
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))          # run from a checkout without installing

from dlconv import bench  # noqa: E402  (imports neither TensorFlow nor Numba)

KINDS = (("cpu", "CPU"), ("gpu", "GPU"))

#: GPU targets checked by benchmarks/gpu_check.sh outside the bench's timings.
GPU_CHECK_TARGETS = (("compute-sanitizer (memcheck, racecheck, initcheck, synccheck) over every "
                      "C++ CUDA kernel", "0 errors"),)


def unmeasured_gpu_targets() -> str:
    """The GPU targets, each "not yet measured": what the README says until a GPU run exists."""
    lines = ["| what | target | result |", "|---|---|---|"]
    for t in bench.TARGETS:
        if t.device == "cuda":
            lines.append(f"| {t.label} (fp32, TF32 off) | ≥ {t.min_ratio:g}× | not yet measured |")
    for label, goal in GPU_CHECK_TARGETS:
        lines.append(f"| {label} | {goal} | not yet measured |")
    return "\n".join(lines) + "\n"


def load_results(folder: pathlib.Path) -> list:
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"make_table: skipping {path.name}: {exc}", file=sys.stderr)
            continue
        if d.get("schema") != bench.SCHEMA:
            continue
        d["_file"] = path.name
        roof = path.with_name(f"{path.stem}-roofline.png")
        d["_roofline"] = roof.name if roof.exists() else None
        out.append(d)
    return out


#: Suites of ``dlconv bench --suite`` shown in their own section (runs without a suite
#: field predate the option and are MNIST runs).
SHAPE_SUITES = ("ecal", "all")


def latest(results: list, kind: str, suites=("mnist",)):
    """Newest full run of ``kind`` among runs of ``suites`` (else the newest quick run), or None."""
    cands = [r for r in results if r.get("kind") == kind and r.get("suite", "mnist") in suites]
    if not cands:
        return None
    return max(cands, key=lambda r: (not r.get("quick", False), r.get("timestamp", ""), r["_file"]))


def _alias_maps() -> dict:
    """(backend, device) → {old variant name: new name}, from the variant tables (the Numba
    ones in dlconv.variants, the C++ ones exported by dlconv._C when it is built)."""
    from dlconv import backends, variants
    maps = {("numba", "cpu"): variants.aliases(variants.NUMBA_CPU),
            ("numba", "cuda"): variants.aliases(variants.NUMBA_CUDA)}
    try:
        cpp = backends.get("cpp")
        maps[("cpp", "cpu")] = variants.aliases(cpp.variant_table(False))
        maps[("cpp", "cuda")] = variants.aliases(cpp.variant_table(True))
    except Exception:  # no extension here: C++ names print as they were recorded
        pass
    return maps


def current_names(result: dict) -> dict:
    """``result`` with the variant names of an older release replaced by today's (the
    committed files stay as they were written; the tables print the names the code has)."""
    maps = _alias_maps()
    renames = {}
    rows = []
    for r in result["rows"]:
        new = maps.get((r.get("backend"), r.get("device")), {}).get(r.get("variant"))
        if new is not None:
            renames[r["impl"]] = f"{r['backend']}/{new}"
            r = dict(r, variant=new, impl=renames[r["impl"]])
        rows.append(r)
    targets = [dict(t, best_impl=renames.get(t.get("best_impl"), t.get("best_impl")),
                    why=_rename_in(t.get("why"), renames)) for t in result.get("targets", [])]
    return dict(result, rows=rows, targets=targets)


def _rename_in(text, renames):
    if not text:
        return text
    for old, new in renames.items():
        text = text.replace(f"({old})", f"({new})")
    return text


def _best_rows(result: dict) -> list:
    """Built-in row and, per backend, the fastest correct variant of each layer/pass/device."""
    groups = {}
    for r in result["rows"]:
        groups.setdefault((r["device"], r["layer"], r["pass"]), []).append(r)
    out = []
    for (device, layer, pass_), rows in groups.items():
        out += [r for r in rows if r["is_builtin"]]
        backends = []
        for r in rows:
            if not r["is_builtin"] and r["backend"] not in backends:
                backends.append(r["backend"])
        for b in backends:
            mine = [r for r in rows if r["backend"] == b]
            timed = [r for r in mine if r["median_s"] is not None and not r["is_builtin"]]
            if timed:
                best = min(timed, key=lambda r: r["median_s"])
                n = len(mine)
                if n > 1:
                    best = dict(best, impl=f"{best['impl']} (best of {n})")
                out.append(best)
            else:
                out.append(mine[0])
    return out


def render(result: dict, title: str, full: bool) -> str:
    result = current_names(result)
    shown = result if full else dict(result, rows=_best_rows(result))
    text = bench.format_markdown(shown, title=f"{title} ({result['_file']})")
    if result.get("_roofline"):
        text += (f"\nRoofline (GFLOP/s against FLOP/byte under the roof this run measured): "
                 f"`benchmarks/results/{result['_roofline']}`\n")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(HERE / "results"), help="folder of results JSONs")
    ap.add_argument("--full", action="store_true", help="every variant instead of the best per backend")
    args = ap.parse_args(argv)
    results = load_results(pathlib.Path(args.results))
    parts = []
    for kind, title in KINDS:
        r = latest(results, kind)
        if r is None:
            parts.append(f"### {title} — not yet measured\n\nNo {title} result in "
                         f"benchmarks/results/ yet"
                         + (" (run `benchmarks/gpu_check.sh OUT_DIR` on a GPU machine and commit "
                            "OUT_DIR/gpu-bench.json there). No dlconv CUDA kernel has been timed "
                            "or sanitized on a GPU; every GPU target is not yet measured:\n\n"
                            + unmeasured_gpu_targets() if kind == "gpu" else
                            " (run `dlconv bench --out benchmarks/results`).") + "\n")
            continue
        parts.append(render(r, title, args.full))
    r = latest(results, "cpu", SHAPE_SUITES)
    if r is not None:
        parts.append(render(r, f"CPU, shape suite `--suite {r['suite']}`", args.full))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
