"""MNIST for the workshop: :func:`load_mnist` finds it, or a real stand-in, and says which.

Where the images come from, first hit wins:

1. ``path`` (argument) or the ``DLCONV_MNIST`` environment variable: an ``mnist.npz``
   (Keras' format: ``x_train, y_train, x_test, y_test``) or a folder holding the IDX
   files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
   ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``; gzipped or not, or an
   ``mnist.npz``).  A folder with only the two ``t10k`` files is valid: the result then
   holds the 10,000 test images only (``test_only`` is True and ``note`` says so).
   An explicit path that does not hold MNIST is an error, never a silent fallback.
2. Keras' cache, ``$KERAS_HOME/datasets/mnist.npz`` (``~/.keras/datasets/mnist.npz``).
3. Keras' download (``keras.datasets.mnist.load_data()``), unless ``download=False``.
4. A real dataset that ships inside a dependency: scikit-learn's ``load_digits`` (1,797
   handwritten digits, 8×8, values 0–16), each resized bilinearly to 20×20 and centred in
   a 28×28 frame, as MNIST's digits are, and scaled to MNIST's 0–255 range.  This is
   announced in one line on stderr.

The result is an :class:`MNIST` record: uint8 images ``(N, 28, 28)``, uint8 labels
``(N,)``, ``source`` (where it came from) and ``note`` (one line for the user).
``ds.as_keras()`` gives Keras' ``((x_train, y_train), (x_test, y_test))``.

:func:`training_split` turns a record into the arrays a run trains on: when only the
test set is there it applies the workshop's split (train on the first 8,000 test images,
evaluate on the last 2,000) and says so.

A corrupt file is an error naming the file and what is wrong (bad magic number,
truncated gzip, header/payload size mismatch, image/label count mismatch).  The IDX
parser is hand-written with NumPy: the format is a 4-byte magic number (two zero bytes,
a type code — 0x08 for unsigned bytes — and the number of dimensions), then one
big-endian int32 per dimension, then the payload.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
import sys
import zipfile
import zlib
from typing import Optional, Tuple

import numpy as np

__all__ = ["MNIST", "load_mnist", "read_idx", "training_split", "WORKSHOP_SPLIT", "IDX_FILES"]

#: The four IDX files of MNIST (each may also be uncompressed, without ".gz").
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz",
}
#: The workshop's split of the 10,000-image test set when nothing else is available.
WORKSHOP_SPLIT = (8000, 2000)

_UBYTE = 0x08


@dataclasses.dataclass(frozen=True)
class MNIST:
    """MNIST (or its stand-in): uint8 images (N, 28, 28), uint8 labels (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    #: Where it came from, e.g. ``"idx:/data/mnist"``, ``"npz:~/.keras/datasets/mnist.npz"``,
    #: ``"keras-download"`` or ``"sklearn-digits"``.
    source: str
    #: One line for the user: what was loaded and anything unusual about it.
    note: str = ""

    @property
    def test_only(self) -> bool:
        """True when only the test set was found (no training images)."""
        return len(self.x_train) == 0

    @property
    def is_standin(self) -> bool:
        """True when this is scikit-learn's digits, not MNIST."""
        return self.source == "sklearn-digits"

    def as_keras(self):
        """``((x_train, y_train), (x_test, y_test))``, as ``keras.datasets.mnist.load_data``."""
        return (self.x_train, self.y_train), (self.x_test, self.y_test)


# ----------------------------------------------------------------------------- IDX
def _read_bytes(path: pathlib.Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except EOFError as exc:
        raise ValueError(f"{path}: truncated gzip file ({exc})") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{path}: not a valid gzip file ({exc})") from None


def read_idx(path, expected_ndim: Optional[int] = None) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) of unsigned bytes → a uint8 array.

    ValueError naming the file for a bad magic number, a wrong number of dimensions,
    or a payload whose size does not match the header.
    """
    path = pathlib.Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    magic = data[:4]
    if magic[0] != 0 or magic[1] != 0 or magic[2] != _UBYTE:
        raise ValueError(f"{path}: bad magic number 0x{magic.hex()} (expected 0x000008NN: "
                         "an IDX file of unsigned bytes)")
    ndim = magic[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: bad magic number 0x{magic.hex()}: {ndim} dimensions, "
                         f"expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated header ({len(data)} bytes, need {header} for "
                         f"{ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(data) - header
    if payload != expected:
        raise ValueError(f"{path}: size mismatch between header and payload: header says "
                         f"{' x '.join(map(str, dims))} = {expected} bytes, the payload has {payload}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _find(folder: pathlib.Path, gz_name: str) -> Optional[pathlib.Path]:
    for name in (gz_name, gz_name[:-3]):
        p = folder / name
        if p.is_file():
            return p
    return None


def _load_pair(folder: pathlib.Path, xkey: str, ykey: str):
    xp, yp = _find(folder, IDX_FILES[xkey]), _find(folder, IDX_FILES[ykey])
    if xp is None and yp is None:
        return None
    if xp is None or yp is None:
        have, missing = (xp or yp), (IDX_FILES[xkey] if xp is None else IDX_FILES[ykey])
        raise ValueError(f"{folder}: found {have.name} but not {missing} (or its uncompressed form)")
    x = read_idx(xp, expected_ndim=3)
    y = read_idx(yp, expected_ndim=1)
    if x.shape[1:] != (28, 28):
        raise ValueError(f"{xp}: images are {x.shape[1]}x{x.shape[2]}, expected 28x28")
    if len(x) != len(y):
        raise ValueError(f"labels/images count mismatch: {xp} holds {len(x)} images but "
                         f"{yp} holds {len(y)} labels")
    if y.size and y.max() > 9:
        raise ValueError(f"{yp}: labels must be 0-9, found {int(y.max())}")
    return x, y


def _empty():
    return np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.uint8)


def _load_folder(folder: pathlib.Path) -> MNIST:
    if (folder / "mnist.npz").is_file() and _find(folder, IDX_FILES["x_test"]) is None:
        return _load_npz(folder / "mnist.npz")
    train = _load_pair(folder, "x_train", "y_train")
    test = _load_pair(folder, "x_test", "y_test")
    if test is None:
        raise ValueError(f"{folder} holds no MNIST test set: expected {IDX_FILES['x_test']} and "
                         f"{IDX_FILES['y_test']} (or mnist.npz)")
    if train is None:
        note = (f"MNIST test set only ({len(test[0]):,} images) from {folder}: "
                "no train-*-ubyte files there")
        train = _empty()
    else:
        note = f"MNIST from {folder}: {len(train[0]):,} training and {len(test[0]):,} test images"
    return MNIST(train[0], train[1], test[0], test[1], source=f"idx:{folder}", note=note)


def _check_npz_array(path: pathlib.Path, key: str, a: np.ndarray, ndim: int, high: int) -> np.ndarray:
    """One array of an MNIST npz as uint8: integers in 0..high with ``ndim`` dimensions.

    Float images are refused, not scaled: the npz format (Keras' mnist.npz) holds uint8
    pixels 0..255, and a float array may be scaled to [0, 1], to [0, 255] or standardised;
    guessing would silently give all-0/1 images (the bug this replaces) or wrong ones."""
    if a.dtype == object or a.dtype.kind not in "iu":
        hint = (" (images scaled to [0, 1]: save (x * 255).round().astype(np.uint8))"
                if a.dtype.kind == "f" and key.startswith("x") else "")
        raise ValueError(f"{path}: {key} has dtype {a.dtype}, expected integers 0..{high} (uint8){hint}")
    if a.ndim != ndim:
        want = "(N, 28, 28)" if ndim == 3 else "(N,)"
        raise ValueError(f"{path}: {key} has shape {a.shape}, expected {want}")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > high:
            what = "labels" if key.startswith("y") else "pixel values"
            raise ValueError(f"{path}: {key} holds {what} {lo}..{hi}, expected 0..{high}")
    return a.astype(np.uint8, copy=False)


def _load_npz(path: pathlib.Path, source: Optional[str] = None) -> MNIST:
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: unreadable or truncated npz file (not a zip archive of .npy arrays: "
                         f"a text file, a lone .npy, a cut download)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in IDX_FILES if k not in f.files]
            if missing:
                raise ValueError(f"{path}: not an MNIST npz: missing {missing} (has {f.files})")
            arrays = {}
            for k in IDX_FILES:
                try:
                    arrays[k] = np.asarray(f[k])
                except ValueError as exc:   # object arrays: NumPy's allow_pickle message
                    raise ValueError(f"{path}: {k} is an object (pickled) array, refused "
                                     f"(allow_pickle=False); MNIST arrays are uint8 ({exc})") from None
    except (OSError, zlib.error, EOFError) as exc:
        raise ValueError(f"{path}: unreadable or truncated npz file ({exc})") from None
    except Exception as exc:  # zipfile.BadZipFile and friends
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"{path}: unreadable or truncated npz file ({type(exc).__name__}: {exc})") from None
    for split in ("train", "test"):
        xk, yk = f"x_{split}", f"y_{split}"
        x = arrays[xk] = _check_npz_array(path, xk, arrays[xk], 3, 255)
        y = arrays[yk] = _check_npz_array(path, yk, arrays[yk], 1, 9)
        if x.shape[1:] != (28, 28):
            raise ValueError(f"{path}: {xk} has shape {x.shape}, expected (N, 28, 28)")
        if len(x) != len(y):
            raise ValueError(f"{path}: labels/images count mismatch in the {split} split: "
                             f"{len(x)} images, {len(y)} labels")
    note = (f"MNIST from {path}: {len(arrays['x_train']):,} training and "
            f"{len(arrays['x_test']):,} test images")
    return MNIST(**arrays, source=source or f"npz:{path}", note=note)


# ----------------------------------------------------------------------------- fallback
def _resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) → (N, size, size), bilinear with pixel centres aligned (float64)."""
    n, h, w = images.shape

    def weights(src, dst):
        pos = (np.arange(dst) + 0.5) * src / dst - 0.5
        pos = np.clip(pos, 0, src - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        m = np.zeros((dst, src))
        m[np.arange(dst), lo] += 1 - (pos - lo)
        m[np.arange(dst), hi] += pos - lo
        return m

    rows, cols = weights(h, size), weights(w, size)
    return np.einsum("ih,nhw,jw->nij", rows, images.astype(np.float64), cols)


#: scikit-learn digits: the 8×8 digit is drawn at 20×20 in a 28×28 frame (as MNIST's).
_DIGIT_BOX, _FRAME = 20, 28


def _load_sklearn_digits() -> MNIST:
    from sklearn.datasets import load_digits

    d = load_digits()
    img = _resize_bilinear(d.images, _DIGIT_BOX) * (255.0 / 16.0)
    pad = (_FRAME - _DIGIT_BOX) // 2
    frame = np.zeros((len(img), _FRAME, _FRAME), np.float64)
    frame[:, pad:pad + _DIGIT_BOX, pad:pad + _DIGIT_BOX] = img
    x = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    y = d.target.astype(np.uint8)
    n_train = int(round(len(x) * 0.8))
    note = (f"MNIST not found: using scikit-learn's digits ({len(x):,} real handwritten 8x8 "
            f"digits resized to 28x28) as a stand-in, {n_train:,} train / {len(x) - n_train:,} test")
    return MNIST(x[:n_train], y[:n_train], x[n_train:], y[n_train:], source="sklearn-digits",
                 note=note)


def _keras_cache() -> pathlib.Path:
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return pathlib.Path(home) / "datasets" / "mnist.npz"


def load_mnist(path=None, *, download: bool = True, announce: bool = True) -> MNIST:
    """Load MNIST (see the module docstring for the search order) → :class:`MNIST`.

    ``path``: an ``mnist.npz`` or a folder of IDX files; default ``$DLCONV_MNIST``.
    ``download``: try Keras' download when nothing local is found.
    ``announce``: print the one-line notice to stderr when falling back to the stand-in.
    """
    explicit = path if path is not None else os.environ.get("DLCONV_MNIST") or None
    if explicit is not None:
        p = pathlib.Path(os.path.expanduser(str(explicit)))
        origin = "path" if path is not None else "DLCONV_MNIST"
        if p.is_dir():
            return _load_folder(p)
        if p.is_file():
            if p.suffix == ".npz":
                return _load_npz(p)
            raise ValueError(f"{origin}={str(explicit)!r}: expected an mnist.npz file or a folder "
                             "of IDX files")
        raise ValueError(f"{origin}={str(explicit)!r} does not exist")
    cache = _keras_cache()
    if cache.is_file():
        return _load_npz(cache, source=f"keras-cache:{cache}")
    failure = "not in Keras' cache"
    if download:
        try:
            import keras
            keras.datasets.mnist.load_data()
            if cache.is_file():
                ds = _load_npz(cache, source="keras-download")
                return dataclasses.replace(ds, note=ds.note + " (downloaded by Keras)")
            failure = "Keras' download gave no file at " + str(cache)
        except Exception as exc:  # no network, proxy, ...: fall back to the stand-in
            failure = f"Keras' download failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    ds = _load_sklearn_digits()
    ds = dataclasses.replace(ds, note=f"{ds.note} [{failure}]")
    if announce:
        print(f"dlconv.data: {ds.note}", file=sys.stderr)
    return ds


# ----------------------------------------------------------------------------- splits
def training_split(ds: MNIST, limit: Optional[int] = None
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """→ ``(x_train, y_train, x_test, y_test, description)`` for a training run.

    With a test-only record, the workshop's split of the test set: the first 8,000
    images train, the last 2,000 evaluate.  ``limit`` keeps the first ``limit`` training
    images.  Images stay uint8 (N, 28, 28); ``description`` says what was chosen.
    """
    if ds.test_only:
        n_train, n_test = WORKSHOP_SPLIT
        if len(ds.x_test) < n_train + n_test:
            raise ValueError(f"the test set has {len(ds.x_test)} images; the workshop split needs "
                             f"{n_train + n_test}")
        x_tr, y_tr = ds.x_test[:n_train], ds.y_test[:n_train]
        x_te, y_te = ds.x_test[-n_test:], ds.y_test[-n_test:]
        desc = (f"only the MNIST test set is available ({ds.source}): workshop split, training "
                f"on its first {n_train:,} images and testing on its last {n_test:,}")
    else:
        x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
        desc = ds.note or ds.source
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        if limit < len(x_tr):
            x_tr, y_tr = x_tr[:limit], y_tr[:limit]
            desc += f"; limited to the first {limit:,} training images"
    return x_tr, y_tr, x_te, y_te, desc
