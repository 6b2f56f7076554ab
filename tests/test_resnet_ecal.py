"""The ECAL ResNet (dlconv.models.resnet_ecal), its generated data set (dlconv.showers),
the ROC AUC (dlconv.metrics) and `dlconv train --model resnet_ecal`."""

import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dlconv import metrics, showers

# ----------------------------------------------------------------------------- AUC


def brute_force_auc(y, s):
    """Count over every (positive, negative) pair: 1 if the positive scores higher, ½ if tied."""
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 60), st.integers(1, 6), st.integers(0, 2 ** 31 - 1))
def test_auc_equals_the_pair_count(n, levels, seed):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)        # both classes present
    s = rng.integers(0, levels, n).astype(float)  # few levels: many ties
    if levels == 6:
        s = rng.normal(size=n)                    # no ties
    want = brute_force_auc(y, s)
    assert metrics.mann_whitney_auc(y, s) == pytest.approx(want, abs=1e-12)
    assert metrics.roc_auc(y, s) == pytest.approx(want, abs=1e-12)


def test_auc_without_scikit_learn(monkeypatch):
    """roc_auc falls back to the rank formula where scikit-learn cannot be imported."""
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)   # import now raises ImportError
    y, s = np.array([0, 1, 1, 0, 1]), np.array([0.3, 0.3, 0.8, 0.1, 0.05])
    assert metrics.roc_auc(y, s) == brute_force_auc(y, s) == pytest.approx(7 / 12)


def test_auc_known_values_and_refusals():
    assert metrics.mann_whitney_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.mann_whitney_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert metrics.mann_whitney_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert metrics.mann_whitney_auc([0, 1, 1], [0.1, 0.9, 0.1]) == 0.75
    with pytest.raises(ValueError, match=r"both classes .* got only \[1\]"):
        metrics.roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match=r"labels 0 and 1, got \[0, 2\]"):
        metrics.roc_auc([0, 2], [0.2, 0.3])
    with pytest.raises(ValueError, match=r"same length, got shapes \(2,\) and \(3,\)"):
        metrics.mann_whitney_auc([0, 1], [0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="1 non-finite"):
        metrics.roc_auc([0, 1], [0.2, np.nan])


# ----------------------------------------------------------------------------- data set
def test_cell_integral_is_the_profile_integral():
    """The closed-form crystal energies equal a fine numerical integration of the surface
    density R²/(π(r²+R²)²), and a centred shower keeps > 99 % in the 32×32 crop."""
    radius, x0, y0, size = 0.9, 0.4, 1.7, 6
    frac = showers.cell_fractions([x0], [y0], [radius], size)[0]
    h = 0.01
    g = (np.arange(size * 220) + 0.5) * h - size // 2 * showers.CRYSTAL_CM
    gx, gy = np.meshgrid(g, g)
    rho = radius ** 2 / (np.pi * ((gx - x0) ** 2 + (gy - y0) ** 2 + radius ** 2) ** 2) * h * h
    numeric = rho.reshape(size, 220, size, 220).sum(axis=(1, 3))
    np.testing.assert_allclose(frac, numeric, rtol=2e-5, atol=1e-7)  # midpoint rule: O(h²)
    # containment in a full crop: the two components of the profile together
    rm = showers.MOLIERE_RADIUS_CM
    full = (showers.CORE_FRACTION * showers.cell_fractions([1.1], [1.1], [0.2 * rm])
            + (1 - showers.CORE_FRACTION) * showers.cell_fractions([1.1], [1.1], [0.8 * rm]))
    assert 0.99 < full.sum() < 1.0
    # the profile's stated containment: 89 % within one R_M, 98.7 % within 3.5 R_M
    def inside(r):
        return sum(p * r * r / (r * r + (k * rm) ** 2) for p, k in
                   ((showers.CORE_FRACTION, showers.CORE_RADIUS_RM),
                    (1 - showers.CORE_FRACTION, showers.TAIL_RADIUS_RM)))
    assert inside(rm) == pytest.approx(0.891, abs=1e-3)
    assert inside(3.5 * rm) == pytest.approx(0.987, abs=1e-3)


def test_generate_is_seeded_shaped_and_zero_suppressed():
    a, b, c = showers.generate(300, seed=5), showers.generate(300, seed=5), showers.generate(300, seed=6)
    for name in ("x", "y", "energy", "separation"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert not np.array_equal(a.x, c.x)
    assert a.x.shape == (300, 32, 32, 1) and a.x.dtype == np.float32
    assert a.y.dtype == np.uint8 and a.y.sum() == 150 and set(np.unique(a.y)) == {0, 1}
    lo, hi = showers.ENERGY_RANGE_GEV
    assert lo <= a.energy.min() and a.energy.max() <= hi
    nonzero = a.x[a.x != 0]
    assert nonzero.min() >= showers.THRESHOLD_GEV
    assert (a.x == 0).mean() > 0.9                 # the noise is zero-suppressed away
    # without the threshold, noise shows as small readings of both signs
    raw = showers.generate(300, seed=5, threshold=None)
    assert (raw.x < 0).mean() > 0.3
    assert np.array_equal(raw.y, a.y) and np.array_equal(raw.energy, a.energy)
    small = showers.generate(10, seed=1, size=9)
    assert small.x.shape == (10, 9, 9, 1)


def test_the_two_classes_differ_as_physics_says():
    ds = showers.generate(4000, seed=0)
    gamma, pi0 = ds.y == 0, ds.y == 1
    # π⁰ → γγ: the photons are at least 2m/E apart (the symmetric decay), none for a γ
    d_min = showers.ECAL_RADIUS_CM * 2 * showers.PI0_MASS_GEV / ds.energy
    assert np.all(ds.separation[pi0] >= d_min[pi0] * (1 - 1e-9)) and np.all(ds.separation[gamma] == 0)
    # the energy sum is the γ/π⁰ energy within the resolution (a few % lost below threshold)
    ratio = ds.x.sum(axis=(1, 2, 3)) / ds.energy
    assert 0.93 < ratio[gamma].mean() < 1.0 and 0.93 < ratio[pi0].mean() < 1.0
    # a π⁰ deposit is wider (second moment around the centroid, 7×7 crystals) ...
    width = showers.second_moment_width(ds.x, window=3)
    assert width[pi0].mean() > width[gamma].mean() + 0.07
    # ... and the more, the lower its energy (the pair opens as 1/E)
    low, high = ds.energy < 20, ds.energy > 40
    assert metrics.roc_auc(ds.y[low], width[low]) > metrics.roc_auc(ds.y[high], width[high]) + 0.2
    # learnable but not trivial: the width alone separates the classes only in part
    assert 0.7 < metrics.roc_auc(ds.y, width) < 0.9


def test_generate_refusals():
    with pytest.raises(ValueError, match="n must be an int >= 2, got 1"):
        showers.generate(1)
    with pytest.raises(ValueError, match=r"energy_range must be .* got \(0.1, 5.0\)"):
        showers.generate(10, energy_range=(0.1, 5.0))
    with pytest.raises(ValueError, match="window must be in 0..15 for 32x32 images, got 16"):
        showers.second_moment_width(np.zeros((1, 32, 32)), window=16)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        showers.training_split(10, test_fraction=1.0)


# ----------------------------------------------------------------------------- model
keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")


def test_parameter_count_and_the_stock_twin():
    import dlconv.layers as dl
    from dlconv import models, shapes

    ours = models.build("resnet_ecal", backend="auto", seed=3)
    stock = models.resnet_ecal(stock=True, seed=3)
    block16 = 2 * shapes.conv_param_count(3, 16, 16)
    block32 = 2 * shapes.conv_param_count(3, 32, 32)
    down = (shapes.conv_param_count(3, 16, 32) + shapes.conv_param_count(3, 32, 32)
            + shapes.conv_param_count(1, 16, 32))
    formula = (shapes.conv_param_count(7, 1, 16) + 5 * block16 + down + 5 * block32
               + shapes.dense_param_count(32, 2))
    assert ours.count_params() == stock.count_params() == formula == 130_978 \
        == models.ECAL_PARAM_COUNT
    assert [w.shape for w in ours.weights] == [w.shape for w in stock.weights]
    assert all(np.array_equal(a, b) for a, b in zip(ours.get_weights(), stock.get_weights()))
    convs = [layer for layer in ours.layers if isinstance(layer, dl.Conv2D)]
    assert len(convs) == 24 and sum(isinstance(layer, dl.Dense) for layer in ours.layers) == 1
    assert not any(isinstance(layer, (dl.Conv2D, dl.Dense)) for layer in stock.layers)
    assert [(c.kernel_size, c.strides) for c in convs if c.strides != (1, 1)] == [
        ((7, 7), (2, 2)), ((3, 3), (2, 2)), ((1, 1), (2, 2))]
    assert convs[0].output.shape == (None, 16, 16, 16) and convs[-1].output.shape == (None, 8, 8, 32)
    assert ours.output_shape == (None, 2)
    x = showers.prepare(showers.generate(4, seed=0).x)
    np.testing.assert_allclose(ours(x), stock(x), atol=1e-5)
    # any input size: the pooling is global, the parameter count stays
    big = models.resnet_ecal(input_shape=(64, 64, 1), num_classes=3, stock=True)
    assert big.layers[1].output.shape == (None, 32, 32, 16) and big.output_shape == (None, 3)
    assert big.count_params() == formula - shapes.dense_param_count(32, 2) \
        + shapes.dense_param_count(32, 3)


def test_model_refusals():
    from dlconv import models

    with pytest.raises(ValueError, match=r"input_shape must be \(height, width, channels\).*"
                                         r"got \(32, 32\)"):
        models.resnet_ecal(input_shape=(32, 32))
    with pytest.raises(ValueError, match="num_classes must be an int >= 2, got 1"):
        models.resnet_ecal(num_classes=1)
    with pytest.raises(TypeError, match="model 'cnn' takes no arguments .* got \\['input_shape'\\]"):
        models.build("cnn", input_shape=(28, 28, 1))


# ----------------------------------------------------------------------------- dlconv train
def test_train_cli_prints_accuracy_and_auc(capsys):
    from dlconv import cli

    # one short run (the twin comparison is measured in docs/resnet_ecal.md: two models'
    # graph tracing would double this test's time)
    code = cli.main(["train", "--model", "resnet_ecal", "--events", "160", "--epochs", "1",
                     "--batch-size", "40", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "generated ECAL showers (dlconv.showers, seed 0)" in out and "120 train / 40 test" in out
    assert "model: resnet_ecal, 120 training / 40 test images, 1 epoch(s), batch size 40" in out
    m = re.search(r"^dlconv \((\w+)\): test accuracy ([0-9.]+), test AUC ([0-9.]+), "
                  r"[0-9.]+ s/epoch$", out, re.M)
    assert m, out
    acc, auc = float(m.group(2)), float(m.group(3))
    assert 0 <= acc <= 1 and 0 <= auc <= 1
    table = out.strip().splitlines()[-3:]
    assert table[0].split()[:6] == ["run", "test", "acc", "test", "AUC", "test"]
    assert table[2].split()[2:4] == [f"{acc:.4f}", f"{auc:.4f}"]


@pytest.mark.parametrize("argv,message", [
    (["--model", "resnet_ecal", "--data", "x.npz"], "--data is MNIST's"),
    (["--model", "dense", "--events", "100"], "--events is for the generated-shower models"),
    (["--model", "resnet_ecal", "--events", "4"], "--events must be at least 8"),
])
def test_train_cli_refusals(argv, message, capsys):
    from dlconv import cli

    assert cli.main(["train", *argv]) == 2
    assert message in capsys.readouterr().err
