"""Numba kernels in child processes: a child started with ``fork`` (multiprocessing's
default on Linux), ``spawn`` or ``forkserver`` after the parent ran a Numba kernel runs one
too and gets the same numbers (kernels/__init__.py pins Numba's ``workqueue`` threading
layer; GNU OpenMP's ``omp`` layer killed a forked child).  The cpp backend likewise.  Each
check runs in a fresh interpreter (the layer is chosen at the first parallel launch),
bounded by timeouts so a hang fails instead of stalling CI."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, os, sys
    os.environ.pop("NUMBA_THREADING_LAYER", None)
    import numpy as np
    from dlconv import ops

    def run(backend):
        x = np.arange(2 * 8 * 8 * 4, dtype=np.float32).reshape(2, 8, 8, 4) / 100
        w = np.ones((3, 3, 4, 8), np.float32)
        y = ops.conv2d(x, w, activation="relu", backend=backend)
        d = ops.dense(x.reshape(2, -1), np.ones((256, 3), np.float32), backend=backend)
        return float(y.sum()) + float(d.sum())

    def child(backend, q):
        q.put(run(backend))

    if __name__ == "__main__":
        backend, ctx = sys.argv[1], sys.argv[2]
        expected = run(backend)                      # the parent runs a kernel first
        if backend == "numba":
            import numba
            assert numba.threading_layer() == "workqueue", numba.threading_layer()
        c = mp.get_context(ctx)
        q = c.Queue()
        p = c.Process(target=child, args=(backend, q))
        p.start()
        p.join(120)
        if p.is_alive():
            p.kill()
            sys.exit("child hung")
        assert p.exitcode == 0, f"child exit code {p.exitcode}"
        got = q.get(timeout=10)
        assert got == expected, (got, expected)
        print("ok", ctx, got)
""")


@pytest.mark.parametrize("backend", ["numba", "cpp"])
@pytest.mark.parametrize("ctx", ["fork", "spawn", "forkserver"])
def test_child_process_runs_kernels_after_parent(tmp_path, backend, ctx):
    script = tmp_path / "fork_check.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), backend, ctx], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"ok {ctx}")
