"""``dlconv bench``'s MNIST CNN inference rows (issue 12, dlconv.bench.inference): batch 1 and
8, dlconv(cpp) vs stock Keras on TensorFlow, every mode timed, checked against the stock
predictions, ratio = best mode over best mode with the ≤ 1.0× targets; the main job's JSON
carries them next to its existing keys; benchmarks/tf_inference.py is a caller of it."""

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.config.backend() != "tensorflow":
    pytest.skip("the inference rows are measured on Keras' TensorFlow backend", allow_module_level=True)

from dlconv.bench import inference, targets  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_inference_rows_are_checked_timed_in_every_mode_and_carry_the_targets():
    rows = inference.run_inference("cpp", rounds=2, warmup=1, progress=False)
    assert [r["batch"] for r in rows] == [1, 8]
    for r in rows:
        assert r["status"] == "ok" and r["correct"] is True and r["max_rel_err"] <= r["tol"], r
        assert set(r["modes"]) == set(inference.MODES) and r["path"] in ("native", "callbacks")
        best_ours = min(m["dlconv_s"] for m in r["modes"].values())
        best_stock = min(m["stock_s"] for m in r["modes"].values())
        assert r["median_s"] == best_ours and r["stock_median_s"] == best_stock
        assert r["ratio"] == pytest.approx(best_ours / best_stock)
        assert r["target"] == targets.INFERENCE_TARGETS[("cpp", r["batch"])] == 1.0
        assert r["target_met"] is (r["ratio"] <= 1.0)
    lines = inference.inference_targets(rows)
    assert [t["label"] for t in lines] == [
        f"MNIST CNN inference, batch {b}, dlconv(cpp) vs stock Keras (best mode, time ratio)" for b in (1, 8)]
    text = "\n".join(inference.table_text(rows, lambda h, rs: "\n".join(" | ".join(x) for x in [h] + rs)))
    assert "MNIST CNN inference on TensorFlow" in text and "predict_on_batch" in text


def test_cli_main_job_json_has_the_inference_rows_and_keeps_its_keys(tmp_path):
    cmd = [sys.executable, "-m", "dlconv", "bench", "--quick", "--layers", "dense2", "--passes",
           "forward", "--backends", "cpp", "--batch", "2", "--repeats", "1", "--no-keras-backends",
           "--no-progress", "--out", str(tmp_path), "--name", "m"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads((tmp_path / "m.json").read_text())
    for key in ("rows", "train_rows", "overhead_rows", "targets", "settings", "machine"):
        assert key in d
    inf = d["inference_rows"]
    assert [(r["batch"], r["status"], r["correct"]) for r in inf] == [(1, "ok", True), (8, "ok", True)]
    assert all(r["ratio"] > 0 and r["rounds"] == inference.QUICK_ROUNDS for r in inf)
    labels = [t["label"] for t in d["targets"]]
    assert "MNIST CNN inference, batch 1, dlconv(cpp) vs stock Keras (best mode, time ratio)" in labels
    assert "MNIST CNN inference on TensorFlow" in out.stdout


def test_tf_inference_script_is_a_caller_of_the_bench():
    text = (ROOT / "benchmarks" / "tf_inference.py").read_text()
    assert "run_inference" in text and "rotating_round_robin" not in text and "perf_counter" not in text
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tf_inference.py"), "--paths",
                          "callbacks", "--batches", "1", "--rounds", "2", "--warmup", "1",
                          "--train-rounds", "0"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "bridge path: callbacks" in out.stdout and "best (" in out.stdout
