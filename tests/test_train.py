"""dlconv train: the command line, its output, and its refusals."""

import re

import pytest

pytest.importorskip("tensorflow")

from dlconv import cli, train  # noqa: E402


def run_cli(argv, capsys):
    code = cli.main(["train", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def accuracies(out):
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(dlconv \(\w+\)|stock keras): test accuracy ([0-9.]+), "
                                 r"[0-9.]+ s/epoch$", out, re.M)}


def test_compare_on_the_workshop_split(mnist_dir, capsys):
    code, out, _ = run_cli(["--model", "dense", "--backend", "reference", "--epochs", "4",
                            "--limit", "2000", "--data", str(mnist_dir), "--compare", "--quiet"],
                           capsys)
    assert code == 0
    assert ("data: only the MNIST test set is available (idx:" in out
            and "training on its first 8,000 images and testing on its last 2,000" in out
            and "limited to the first 2,000 training images" in out)
    assert "model: dense, 2,000 training / 2,000 test images, 4 epoch(s), batch size 128, seed 0" in out
    acc = accuracies(out)
    assert set(acc) == {"dlconv (reference)", "stock keras"}
    # Same seed, same data: the two runs agree; 2,000 images for 4 epochs reach 0.85.
    assert acc["dlconv (reference)"] >= 0.8
    assert abs(acc["dlconv (reference)"] - acc["stock keras"]) <= 0.01
    table = out.strip().splitlines()[-4:]
    assert table[0].split()[:4] == ["run", "test", "acc", "test"]
    assert table[2].startswith("dlconv (reference)") and table[3].startswith("stock keras")
    assert table[3].endswith("1.00x")


def test_stand_in_when_mnist_is_absent(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DLCONV_MNIST", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    code, out, err = run_cli(["--model", "dense", "--backend", "reference", "--epochs", "5",
                              "--batch-size", "32", "--offline", "--quiet", "--seed", "1"], capsys)
    assert code == 0
    assert err.count("dlconv.data: MNIST not found: using scikit-learn's digits") == 1
    assert "model: dense, 1,438 training / 359 test images, 5 epoch(s), batch size 32" in out
    assert accuracies(out)["dlconv (reference)"] >= 0.83  # 0.88 measured; chance is 0.1


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--batch-size", "x"], "--batch-size must be a positive integer, got 'x'"),
    (["--limit", "-5"], "--limit must be a positive integer, got -5"),
    (["--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
    (["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_data_path_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--backend", "reference", "--data", str(tmp_path / "missing")])
    assert exc.value.code == 2
    assert f"path='{tmp_path / 'missing'}' does not exist" in capsys.readouterr().err


def test_unusable_backend_is_refused_before_training(monkeypatch, capsys):
    import dlconv.backends

    class Off:
        def cpu_status(self):
            return False, "switched off for this test"

    monkeypatch.setattr(dlconv.backends, "get", lambda name: Off())
    code, out, err = run_cli(["--backend", "cpp"], capsys)
    assert code == 2 and out == ""
    assert "backend 'cpp' cannot run on this CPU: switched off for this test" in err


def test_format_table_ratios():
    a = train.RunResult("cnn", "dlconv (cpp)", 0.97, 0.1, [3.0, 1.0], {})
    b = train.RunResult("cnn", "stock keras", 0.975, 0.09, [1.0, 1.0], {})
    lines = train.format_table([a, b]).splitlines()
    assert lines[2].split()[-2:] == ["2.00", "2.00x"]
    assert lines[3].split()[-2:] == ["1.00", "1.00x"]
    assert "0.9700" in lines[2] and "0.9750" in lines[3]
