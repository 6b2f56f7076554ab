"""How long libgomp's idle threads spin: dlconv's default, set before libgomp loads.

After every parallel region libgomp's worker threads spin, waiting for more work, up to
``GOMP_SPINCOUNT`` ``pause`` loops (default 300000, ~10 ms on CPUs where ``pause`` costs ~140
cycles) before they sleep.  Inside a TensorFlow step that spinning worker takes the core from
the stock TF op running beside the dlconv kernel (TF's other inter-op thread: Adam's update, an
AddN), and on a busy machine from the kernel's own preempted worker.  dlconv's default,
:data:`SPIN_COUNT`, spins ~0.1-0.3 ms: long enough that back-to-back regions of one kernel (and
back-to-back small kernels) find the worker awake, short enough that it sleeps before the next
framework op needs the core.

libgomp reads the variable once, when it is loaded, which is the first time ``dlconv._C`` or
TensorFlow op library (``dlconv.tf_ops``) is imported — or any other library linking the
system ``libgomp.so.1``.  So :func:`apply` runs at ``import dlconv`` and again right before
either of those loads; it sets ``GOMP_SPINCOUNT`` only when the user has set neither it nor
``OMP_WAIT_POLICY`` (a user's choice always wins), and :func:`status` (``dlconv info``) says
whether libgomp was already loaded when dlconv first looked, i.e. whether the setting could take
effect.  Vendored copies (``libgomp-<hash>.so`` inside torch or scikit-learn wheels) are other
instances, read their own environment when they load, and do not run dlconv's kernels.
"""

from __future__ import annotations

import os
import re

__all__ = ["SPIN_COUNT", "apply", "status", "libgomp_loaded"]

#: dlconv's GOMP_SPINCOUNT (see the module docstring).  Measured on the 2-core EPYC (train
#: steps, interleaved against stock, in benchmarks/ and csrc/tf_ops.cpp's threading note).
SPIN_COUNT = "10000"
VAR = "GOMP_SPINCOUNT"
POLICY_VAR = "OMP_WAIT_POLICY"
# Marks a GOMP_SPINCOUNT that dlconv set, so that child processes (which inherit it) still
# report it as dlconv's default rather than the user's.
MARK_VAR = "DLCONV_GOMP_SPINCOUNT_DEFAULT"

# The system libgomp dlconv._C and the TF op library link (soname libgomp.so.1); vendored
# copies are named libgomp-<hash>.so.* and do not match.
_SYSTEM_LIBGOMP = re.compile(r"/libgomp\.so(\.\d+)*$")

_state = {}


def libgomp_loaded() -> bool | None:
    """Whether the system libgomp is mapped into this process (None: cannot tell, no /proc)."""
    try:
        with open("/proc/self/maps") as f:
            return any(_SYSTEM_LIBGOMP.search(line.rstrip()) for line in f)
    except OSError:
        return None


def apply() -> dict:
    """Sets ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` unless the user set it or
    ``OMP_WAIT_POLICY``; idempotent.  Returns :func:`status`."""
    if not _state:
        loaded = libgomp_loaded()
        inherited = os.environ.get(MARK_VAR) == "1" and os.environ.get(VAR) == SPIN_COUNT
        if inherited:
            source = "dlconv"
        elif VAR in os.environ or POLICY_VAR in os.environ:
            source = "user"
        else:
            os.environ[VAR] = SPIN_COUNT
            os.environ[MARK_VAR] = "1"
            source = "dlconv"
        _state.update(source=source, libgomp_loaded_before=loaded)
    return status()


def status() -> dict:
    """What ``dlconv info`` prints: the spin setting, who chose it, and whether it applies."""
    if not _state:
        apply()
    value = os.environ.get(VAR)
    policy = os.environ.get(POLICY_VAR)
    if _state["source"] == "user":
        what = ", ".join(f"{k}={v}" for k, v in ((VAR, value), (POLICY_VAR, policy)) if v is not None)
        why = f"{what} (set by the user; dlconv sets nothing)"
    else:
        why = f"{VAR}={value} (dlconv's default; libgomp's own is 300000)"
    # A user's value came from the environment the process started with (or is theirs to time).
    effective = _state["source"] == "user" or _state["libgomp_loaded_before"] is not True
    if not effective:
        why += ("; NOT in effect: libgomp was already loaded when dlconv was imported (set it in the "
                "environment before starting Python)")
    return {"GOMP_SPINCOUNT": value, "OMP_WAIT_POLICY": policy, "source": _state["source"],
            "effective": effective, "why": why}
