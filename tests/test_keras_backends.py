"""dlconv.layers under each Keras backend: tests/keras_suite run in a fresh pytest process
per backend (Keras fixes its backend when it is first imported)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

SUITE = pathlib.Path(__file__).with_name("keras_suite")
FRAMEWORK = {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}


@pytest.mark.parametrize("keras_backend", sorted(FRAMEWORK))
def test_keras_suite(keras_backend):
    if importlib.util.find_spec(FRAMEWORK[keras_backend]) is None:
        pytest.skip(f"{FRAMEWORK[keras_backend]} is not installed (pip install -e '.[test]' brings it)")
    env = dict(os.environ, KERAS_BACKEND=keras_backend, DLCONV_KERAS_SUITE="1",
               TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-x", str(SUITE)], capture_output=True, text=True, env=env, timeout=1500)
    tail = out.stdout[-6000:] + out.stderr[-3000:]
    print(tail)
    assert out.returncode == 0, f"Keras suite on {keras_backend} failed:\n{tail}"
    assert " passed" in out.stdout and " failed" not in out.stdout
