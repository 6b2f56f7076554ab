"""dlconv.data: the IDX parser, the search order, corrupt files, the stand-in and the split."""

import gzip
import hashlib
import struct

import numpy as np
import pytest

from dlconv import data


def write_idx(path, arr, magic=None, compress=True, extra=b""):
    arr = np.asarray(arr, np.uint8)
    head = magic if magic is not None else bytes([0, 0, 8, arr.ndim])
    blob = head + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes() + extra
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)
    return path


def fake_split(rng, n):
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8))


def write_folder(folder, rng, n_train=0, n_test=5, compress=True):
    folder.mkdir(exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        if n == 0:
            continue
        x, y = fake_split(rng, n)
        xname, yname = data.IDX_FILES[f"x_{split}"], data.IDX_FILES[f"y_{split}"]
        if not compress:
            xname, yname = xname[:-3], yname[:-3]
        write_idx(folder / xname, x, compress=compress)
        write_idx(folder / yname, y, compress=compress)
        out[split] = (x, y)
    return out


# ----------------------------------------------------------------------------- real data
def test_real_mnist_test_set(mnist_dir):
    ds = data.load_mnist(mnist_dir)
    assert ds.test_only and ds.source == f"idx:{mnist_dir}"
    assert "test set only" in ds.note and "10,000" in ds.note
    assert ds.x_test.shape == (10000, 28, 28) and ds.x_test.dtype == np.uint8
    assert ds.y_test.shape == (10000,)
    assert ds.x_train.shape == (0, 28, 28) and ds.y_train.shape == (0,)
    # The well-known first labels of the MNIST test set, and its class counts.
    assert ds.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ds.x_test.max() == 255 and ds.x_test.min() == 0
    assert 33.0 < ds.x_test.mean() < 34.0  # MNIST's mean intensity, 33.79 on the test set
    # The raw payload (after the 16-byte header) is exactly what we return.
    with gzip.open(mnist_dir / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    assert hashlib.md5(raw[16:]).hexdigest() == hashlib.md5(ds.x_test.tobytes()).hexdigest()


def test_real_mnist_via_environment(mnist_dir, monkeypatch):
    monkeypatch.setenv("DLCONV_MNIST", str(mnist_dir))
    assert data.load_mnist().source == f"idx:{mnist_dir}"


def test_workshop_split_of_the_real_test_set(mnist_dir):
    ds = data.load_mnist(mnist_dir)
    x_tr, y_tr, x_te, y_te, desc = data.training_split(ds)
    assert (len(x_tr), len(x_te)) == (8000, 2000)
    np.testing.assert_array_equal(x_tr, ds.x_test[:8000])
    np.testing.assert_array_equal(y_te, ds.y_test[8000:])
    assert "first 8,000" in desc and "last 2,000" in desc
    x_tr, _, x_te, _, desc = data.training_split(ds, limit=1000)
    assert (len(x_tr), len(x_te)) == (1000, 2000) and "first 1,000 training images" in desc


# ----------------------------------------------------------------------------- formats
def test_full_folder_gz_and_plain(tmp_path, rng):
    for compress in (True, False):
        folder = tmp_path / f"mnist_{compress}"
        written = write_folder(folder, rng, n_train=7, n_test=3, compress=compress)
        ds = data.load_mnist(folder)
        assert not ds.test_only
        np.testing.assert_array_equal(ds.x_train, written["train"][0])
        np.testing.assert_array_equal(ds.y_train, written["train"][1])
        np.testing.assert_array_equal(ds.x_test, written["test"][0])
        (xtr, ytr), (xte, yte) = ds.as_keras()
        assert xtr.shape == (7, 28, 28) and yte.shape == (3,)
        _, _, x_te, _, _ = data.training_split(ds)
        assert len(x_te) == 3


def test_npz_file_and_keras_cache(tmp_path, rng, monkeypatch):
    (xtr, ytr), (xte, yte) = fake_split(rng, 6), fake_split(rng, 4)
    npz = tmp_path / "mnist.npz"
    np.savez(npz, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    ds = data.load_mnist(npz)
    assert ds.source == f"npz:{npz}"
    np.testing.assert_array_equal(ds.x_test, xte)
    # Keras' cache: $KERAS_HOME/datasets/mnist.npz, used when no path is given.
    home = tmp_path / "keras_home"
    (home / "datasets").mkdir(parents=True)
    np.savez(home / "datasets" / "mnist.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    monkeypatch.delenv("DLCONV_MNIST", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(home))
    ds = data.load_mnist(download=False)
    assert ds.source.startswith("keras-cache:")
    np.testing.assert_array_equal(ds.y_train, ytr)


def test_stand_in_from_scikit_learn(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DLCONV_MNIST", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty Keras cache
    ds = data.load_mnist(download=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dlconv.data: MNIST not found")
    assert "scikit-learn" in err[0]
    assert ds.is_standin and ds.source == "sklearn-digits"
    assert ds.x_train.shape == (1438, 28, 28) and ds.x_test.shape == (359, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.max() == 255
    # The digit sits in the central 20x20 box; the 4-pixel frame is empty, as in MNIST.
    assert ds.x_train[:, :4].max() == 0 and ds.x_train[:, :, -4:].max() == 0
    from sklearn.datasets import load_digits
    d = load_digits()
    np.testing.assert_array_equal(ds.y_test, d.target[1438:])
    # Resizing keeps each image's shape: its 8x8 block means track the original 8x8 image.
    img = ds.x_train[0, 4:24, 4:24].astype(float)
    coarse = data._resize_bilinear(img[None], 8)[0]
    assert np.corrcoef(coarse.ravel(), d.images[0].ravel())[0, 1] > 0.95
    capsys.readouterr()
    data.load_mnist(download=False, announce=False)
    assert capsys.readouterr().err == ""


def test_download_failure_falls_back(tmp_path, monkeypatch, capsys):
    """Keras' download is tried (no network here, or a stub that fails) before the stand-in."""
    import keras
    calls = []

    def failing_load():
        calls.append(1)
        raise OSError("URL fetch failure (no network in this test)")

    monkeypatch.delenv("DLCONV_MNIST", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras.datasets.mnist, "load_data", failing_load)
    ds = data.load_mnist()
    assert calls == [1] and ds.is_standin
    assert "Keras' download failed (OSError: URL fetch failure" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors
def test_bad_magic_number(tmp_path, rng):
    folder = tmp_path / "m"
    write_folder(folder, rng)
    x, _ = fake_split(rng, 5)
    bad = write_idx(folder / data.IDX_FILES["x_test"], x, magic=bytes([0, 0, 9, 3]))
    with pytest.raises(ValueError, match=rf"{bad}: bad magic number 0x00000903"):
        data.load_mnist(folder)
    write_idx(bad, x, magic=bytes([0x1f, 0x8b, 8, 3]))
    with pytest.raises(ValueError, match="bad magic number 0x1f8b0803"):
        data.load_mnist(folder)


def test_labels_file_with_image_magic(tmp_path, rng):
    folder = tmp_path / "m"
    write_folder(folder, rng)
    x, _ = fake_split(rng, 5)
    bad = write_idx(folder / data.IDX_FILES["y_test"], x)
    with pytest.raises(ValueError, match=rf"{bad}: bad magic number 0x00000803: 3 dimensions, "
                                         "expected 1"):
        data.load_mnist(folder)


def test_truncated_gzip(tmp_path, rng):
    folder = tmp_path / "m"
    write_folder(folder, rng, n_test=50)
    f = folder / data.IDX_FILES["x_test"]
    blob = f.read_bytes()
    f.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=rf"{f}: truncated gzip"):
        data.load_mnist(folder)
    f.write_bytes(b"this is not gzip at all")
    with pytest.raises(ValueError, match=rf"{f}: not a valid gzip"):
        data.load_mnist(folder)


def test_size_mismatch_between_header_and_payload(tmp_path, rng):
    folder = tmp_path / "m"
    write_folder(folder, rng)
    x, _ = fake_split(rng, 5)
    f = write_idx(folder / data.IDX_FILES["x_test"], x, extra=b"\x00" * 10)
    with pytest.raises(ValueError, match=rf"{f}: size mismatch between header and payload: header "
                                         r"says 5 x 28 x 28 = 3920 bytes, the payload has 3930"):
        data.load_mnist(folder)
    # A payload cut short (an uncompressed file truncated on disk).
    f.unlink()
    f2 = write_idx(folder / data.IDX_FILES["x_test"][:-3], x, compress=False)
    f2.write_bytes(f2.read_bytes()[:-100])
    with pytest.raises(ValueError, match="header says 5 x 28 x 28 = 3920 bytes, the payload has 3820"):
        data.load_mnist(folder)


def test_labels_images_count_mismatch(tmp_path, rng):
    folder = tmp_path / "m"
    write_folder(folder, rng, n_test=5)
    write_idx(folder / data.IDX_FILES["y_test"], np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match=r"labels/images count mismatch: .* holds 5 images but "
                                         r".* holds 4 labels"):
        data.load_mnist(folder)


def test_bad_npz(tmp_path):
    npz = tmp_path / "mnist.npz"
    np.savez(npz, x_train=np.zeros((3, 28, 28), np.uint8), y_train=np.zeros(2, np.uint8),
             x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match="count mismatch in the train split: 3 images, 2 labels"):
        data.load_mnist(npz)
    np.savez(npz, images=np.zeros(3))
    with pytest.raises(ValueError, match=r"not an MNIST npz: missing \['x_train'"):
        data.load_mnist(npz)
    npz.write_bytes(npz.read_bytes()[:40])
    with pytest.raises(ValueError, match=rf"{npz}: unreadable or truncated npz"):
        data.load_mnist(npz)


def test_explicit_paths_never_fall_back(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"path='.*nowhere' does not exist"):
        data.load_mnist(tmp_path / "nowhere")
    monkeypatch.setenv("DLCONV_MNIST", str(tmp_path / "gone"))
    with pytest.raises(ValueError, match=r"DLCONV_MNIST='.*gone' does not exist"):
        data.load_mnist()
    with pytest.raises(ValueError, match="holds no MNIST test set"):
        data.load_mnist(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="expected an mnist.npz file or a folder"):
        data.load_mnist(tmp_path / "x.txt")


def test_one_file_of_a_pair_missing(tmp_path, rng):
    folder = tmp_path / "m"
    write_folder(folder, rng)
    (folder / data.IDX_FILES["y_test"]).unlink()
    with pytest.raises(ValueError, match="found t10k-images-idx3-ubyte.gz but not "
                                         "t10k-labels-idx1-ubyte.gz"):
        data.load_mnist(folder)


def test_split_limit_is_checked(tmp_path, rng):
    folder = tmp_path / "m"
    write_folder(folder, rng, n_train=4, n_test=2)
    ds = data.load_mnist(folder)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"limit must be a positive integer, got {bad!r}"):
            data.training_split(ds, limit=bad)
    small = data.load_mnist(write_folder(tmp_path / "s", rng, n_test=9) and tmp_path / "s")
    with pytest.raises(ValueError, match="has 9 images; the workshop split needs 10000"):
        data.training_split(small)


def _npz(tmp_path, **override):
    arrays = dict(x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2, np.uint8),
                  x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.zeros(1, np.uint8))
    arrays.update(override)
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("override,message", [
    ({"x_train": np.full((2, 28, 28), 0.5, np.float32)}, r"x_train has dtype float32, expected integers 0\.\.255"),
    ({"y_train": np.array([12, 1])}, r"y_train holds labels 1\.\.12, expected 0\.\.9"),
    ({"y_test": np.array([-1])}, r"y_test holds labels -1\.\.-1, expected 0\.\.9"),
    ({"x_test": np.full((1, 28, 28), 300, np.int32)}, r"x_test holds pixel values 300\.\.300, expected 0\.\.255"),
    ({"y_test": np.zeros((1, 1), np.uint8)}, r"y_test has shape \(1, 1\), expected \(N,\)"),
    ({"x_test": np.zeros((1, 784), np.uint8)}, r"x_test has shape \(1, 784\), expected \(N, 28, 28\)"),
    ({"y_train": np.array([1.0, 2.0])}, r"y_train has dtype float64"),
    ({"x_train": np.array([1, "a"], dtype=object)}, r"x_train is an object \(pickled\) array, refused"),
])
def test_npz_contents_are_checked(tmp_path, override, message):
    """The npz path checks what the IDX path checks: float images are refused (not cast to
    all-0/1 uint8), labels outside 0..9 (not wrapped to 255), shapes, object arrays; each
    message names the file and the array."""
    path = _npz(tmp_path, **override)
    with pytest.raises(ValueError, match=message) as err:
        data.load_mnist(path)
    assert str(path) in str(err.value)


def test_npz_that_is_not_a_zip(tmp_path):
    for content in (b"hello, not an archive\n", np.lib.format.magic(1, 0) + b"\x00" * 20):
        path = tmp_path / "mnist.npz"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=rf"{path}: unreadable or truncated npz file \(not a zip"):
            data.load_mnist(path)


def test_npz_with_integer_labels_of_any_width(tmp_path):
    ds = data.load_mnist(_npz(tmp_path, y_train=np.array([3, 9], np.int64)))
    assert ds.y_train.dtype == np.uint8 and ds.y_train.tolist() == [3, 9]
