"""Goals (the only typed-in numbers of the bench, and goals, not results): :data:`TARGETS`
for the kernels' ratio to the built-in, :data:`TRAIN_TARGETS` for the train step, and
:func:`summarize_targets`, which marks each met or not from a run's rows.

A kernel target is about what a user gets: it is judged on the row of the dispatch default
of each (layer, pass, backend) — the variant the backend runs with no ``variant=`` for that
geometry (rows with ``"default": True``) — never on a variant the user would have to ask for.
Rows written before the ``default`` field existed are judged on their best variant, as then."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence



@dataclasses.dataclass(frozen=True)
class Target:
    """A goal for the default variant of ``backend`` on one layer/pass/device."""

    device: str               # "cpu" | "cuda"
    layer: str
    pass_: str
    backend: str
    min_ratio: float
    label: str

    def matches(self, row: dict) -> bool:
        return (row["device"] == self.device and row["layer"] == self.layer
                and row["pass"] == self.pass_ and row["backend"] == self.backend)


TARGETS = (
    Target("cpu", "conv2", "forward", "cpp", 1.3, "C++ CPU conv2 forward vs tf.nn.conv2d"),
    Target("cpu", "conv2", "backward-data", "cpp", 1.0, "C++ CPU conv2 backward-data"),
    Target("cpu", "conv2", "backward-filter", "cpp", 1.0, "C++ CPU conv2 backward-filter"),
    Target("cpu", "dense1", "forward", "cpp", 1.0, "C++ CPU dense 9216→128 + bias + relu"),
    Target("cpu", "conv2", "forward", "numba", 0.5, "Numba CPU conv2 forward"),
    Target("cuda", "conv2", "forward", "cpp", 0.7, "best CUDA C++ conv vs cuDNN"),
    Target("cuda", "conv2", "forward", "numba", 0.5, "best Numba CUDA conv vs cuDNN"),
    Target("cuda", "dense1", "forward", "cpp", 0.8, "CUDA C++ dense vs cuBLAS"),
    Target("cuda", "dense1", "forward", "numba", 0.5, "Numba CUDA dense vs cuBLAS"),
)
#: Train step: dlconv(backend) time / stock Keras time must be at most this.
TRAIN_TARGETS = {"cpp": 1.0}
#: The same per train-step model (:data:`~.train_step.TRAIN_MODELS`): the physics ResNet's
#: step at batch 32 (issue 13).
MODEL_TRAIN_TARGETS = {"mnist_cnn": TRAIN_TARGETS, "resnet_ecal": {"cpp": 0.9}}
#: MNIST CNN inference on TensorFlow (issue 12): (backend, batch) → dlconv's best-mode time
#: over stock Keras' best-mode time must be at most this (:mod:`.inference`).
INFERENCE_TARGETS = {("cpp", 1): 1.0, ("cpp", 8): 1.0}
#: Titles of the train-step models in the targets' labels.
MODEL_TITLES = {"mnist_cnn": "MNIST CNN", "resnet_ecal": "ECAL ResNet"}


@dataclasses.dataclass(frozen=True)
class SuiteTarget:
    """A goal for every pass of every shape of a suite (:mod:`.suites`): the default variant
    of ``backend`` on each (layer, pass) of the rows whose ``suite`` is ``suite``."""

    suite: str
    device: str
    backend: str
    min_ratio: float
    label: str

    def matches(self, row: dict) -> bool:
        return (row.get("suite") == self.suite and row["device"] == self.device
                and row["backend"] == self.backend)


#: Issue 13's targets over the ecal suite (ResNet and issue-table shapes).
SUITE_TARGETS = (
    SuiteTarget("ecal", "cpu", "cpp", 1.0, "C++ CPU, every pass of every ecal-suite shape"),
    SuiteTarget("ecal", "cpu", "numba", 0.5, "Numba CPU, every pass of every ecal-suite shape"),
)
#: Train-step time targets on each Keras backend, dlconv(cpp) / stock Keras on the same
#: backend (issue 10); measured by :mod:`.keras_backends`.
STEP_TARGETS = {"torch": 0.6, "jax": 0.3, "tensorflow": 1.0}
#: What a bridge may cost: dlconv's step on torch/JAX over dlconv's step on TensorFlow.
BRIDGE_COST_TARGET = 1.25


def _judged(cands: Sequence[dict]) -> Optional[dict]:
    """The row a target is judged on among one (layer, pass, backend)'s rows: the default
    variant's (timed or not); for rows without the field (older results), the best timed one."""
    if any("default" in r for r in cands):
        return next((r for r in cands if r.get("default")), None)
    timed = [r for r in cands if r["ratio"] is not None]
    return max(timed, key=lambda r: r["ratio"]) if timed else None


def target_for(row: dict):
    """The :class:`Target` (or else :class:`SuiteTarget`) a row is measured against, or None."""
    for t in TARGETS + SUITE_TARGETS:
        if t.matches(row):
            return t
    return None


def _suite_met(met: int, timed: int, missing: bool) -> Optional[bool]:
    """False when a timed (layer, pass) misses the goal; True when every one is timed and
    meets it; None (not measured) otherwise."""
    if met < timed:
        return False
    return None if missing or not timed else True


def _suite_line(t: SuiteTarget, rows: Sequence[dict]) -> Optional[dict]:
    """One line for a suite target: on how many (layer, pass) the default variant met it, and
    the worst of them."""
    groups: dict = {}
    for r in rows:
        if t.matches(r):
            groups.setdefault((r["layer"], r["pass"]), []).append(r)
    if not groups:
        return None
    best = {}
    for key, cands in groups.items():
        judged = _judged(cands)
        best[key] = judged if judged is not None and judged["ratio"] is not None else None
    timed = {k: r for k, r in best.items() if r is not None}
    met = sum(1 for r in timed.values() if r["ratio"] >= t.min_ratio)
    worst = min(timed.items(), key=lambda kv: kv[1]["ratio"]) if timed else None
    missing = [f"{k[0]} {k[1]}" for k, r in best.items() if r is None]
    why = f"{met} of {len(best)} (layer, pass) met"
    if worst is not None:
        why += f"; worst {worst[0][0]} {worst[0][1]} ({worst[1]['impl']})"
    if missing:
        why += "; not timed: " + ", ".join(missing)
    return {"label": t.label, "device": t.device, "layer": f"suite:{t.suite}", "pass": "all",
            "backend": t.backend, "target": f"≥ {t.min_ratio:g}×",
            "best_impl": worst[1]["impl"] if worst else None,
            "value": worst[1]["ratio"] if worst else None,
            "met": _suite_met(met, len(timed), bool(missing)),
            "why": why, "met_count": met, "count": len(best)}



def summarize_targets(rows: Sequence[dict], train_rows: Sequence[dict] = ()) -> List[dict]:
    """One line per target: the default variant's ratio, met or not (or not measured)."""
    out = []
    for t in TARGETS:
        cands = [r for r in rows if t.matches(r)]
        if not cands:
            continue
        best = _judged(cands)
        if best is not None and best["ratio"] is None:
            cands, best = [best], None      # the default path was not timed: say why
        out.append({"label": t.label, "device": t.device, "layer": t.layer, "pass": t.pass_,
                    "backend": t.backend, "target": f"≥ {t.min_ratio:g}×",
                    "best_impl": best["impl"] if best else None,
                    "value": best["ratio"] if best else None,
                    "met": bool(best and best["ratio"] >= t.min_ratio) if best else None,
                    "why": None if best else "; ".join(sorted({str(r["why"]) for r in cands}))})
    for st in SUITE_TARGETS:
        line = _suite_line(st, rows)
        if line is not None:
            out.append(line)
    for r in train_rows:
        if r.get("target") is None:
            continue
        model = r.get("layer", "mnist_cnn")
        out.append({"label": r.get("label") or
                             f"{MODEL_TITLES.get(model, model)} train step dlconv({r['backend']}) "
                             f"vs stock Keras (time ratio)",
                    "device": r.get("device", "cpu"), "layer": model, "pass": "train-step",
                    "backend": r["backend"], "target": f"≤ {r['target']:g}× time",
                    "best_impl": r["impl"], "value": r.get("time_ratio"), "met": r.get("target_met"),
                    "why": r.get("why") if r.get("time_ratio") is None else None})
    for r in train_rows:
        if r.get("keras_backend") in (None, "tensorflow") or r.get("backend") != "cpp":
            continue
        value = r.get("vs_tensorflow")
        out.append({"label": f"dlconv(cpp) train step on Keras {r['keras_backend']} vs on TensorFlow "
                             f"(what the bridge costs)",
                    "device": "cpu", "layer": "mnist_cnn", "pass": "train-step", "backend": "cpp",
                    "target": f"≤ {BRIDGE_COST_TARGET:g}×", "best_impl": r["impl"], "value": value,
                    "met": None if value is None else bool(value <= BRIDGE_COST_TARGET),
                    "why": r.get("why") if value is None else None})
    return out
