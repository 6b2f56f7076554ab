"""The verdict of gpu_check.sh's tests step, from pytest's JUnit XML.

    python benchmarks/gpu_check_junit.py OUT_DIR/pytest-gpu.xml

Fails (exit 1) on any failed or erroring test, and on any module that holds ``gpu``-marked
tests but could not be imported (e.g. one importing TensorFlow at the top: the GPU machine has
none, so its GPU tests would be hidden).  Modules without gpu tests that fail to import (they
need TensorFlow) are listed, not counted.  Skips are listed with their reasons; under
DLCONV_REQUIRE_GPU=1 tests/conftest.py has already turned skipped gpu tests into failures.
"""

from __future__ import annotations

import collections
import sys
import xml.etree.ElementTree as ET


def _collection(case) -> bool:
    """A whole module that failed to import, or skipped itself at import."""
    e = case.find("error") if case.find("error") is not None else case.find("skipped")
    return e is not None and "collection" in (e.get("message") or "")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        root = ET.parse(argv[0]).getroot()
    except Exception as exc:
        print(f"no junit report: {exc}")
        return 1
    cases = list(root.iter("testcase"))
    fail = [c for c in cases if c.find("failure") is not None]
    coll = [c for c in cases if _collection(c)]
    err = [c for c in cases if c.find("error") is not None and c not in coll]
    skip = [c for c in cases if c.find("skipped") is not None and c not in coll]
    passed = len(cases) - len(fail) - len(err) - len(skip) - len(coll)
    print(f"gpu tests: {passed} passed, {len(fail)} failed, {len(err)} errors, {len(skip)} skipped; "
          f"{len(coll)} module(s) not imported here: " + ", ".join(c.get("name") for c in coll))
    reasons = collections.Counter((c.find("skipped").get("message") or "?") for c in skip)
    for why, n in reasons.most_common():
        print(f"  skipped {n:4d} x {why}")
    hidden = []
    for c in coll:
        path = c.get("name", "").replace(".", "/") + ".py"
        try:
            with open(path) as f:
                if "mark.gpu" in f.read():
                    hidden.append(path)
        except OSError:
            pass
    if hidden:
        print("gpu tests HIDDEN: these modules have gpu-marked tests but fail or skip at import here "
              "(no TensorFlow on the GPU machine: import it inside the tests that compare with "
              "TensorFlow, not at module level): " + ", ".join(hidden))
    return 1 if fail or err or hidden else 0


if __name__ == "__main__":
    sys.exit(main())
