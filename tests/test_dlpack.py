"""dlconv.dlpack: the framework-free DLPack reader/writer, and CUDA objects that speak only
DLPack reaching the op API as device arrays (dlconv.arrays).  No GPU here: the capsules are
built over host memory with a CUDA device type, which is all the reader looks at."""

import numpy as np
import pytest

from dlconv import arrays, dlpack


class DLPackOnly:
    """A producer with __dlpack__/__dlpack_device__ and no __cuda_array_interface__."""

    def __init__(self, a, device_type=dlpack.KDL_CUDA, legacy=False):
        self.a, self.device_type, self.legacy = a, device_type, legacy

    def __dlpack_device__(self):
        return (self.device_type, 0)

    def __dlpack__(self, *args, **kwargs):
        if self.legacy and (args or kwargs):
            raise TypeError("__dlpack__() takes no arguments")
        return dlpack.capsule_from_buffer(self.a, self.a.ctypes.data, self.a.shape, self.device_type)


def test_dlpack_only_cuda_object_is_seen_as_a_device_array_without_copy():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    for legacy in (False, True):
        obj = DLPackOnly(a, legacy=legacy)
        assert arrays.is_cuda_array(obj)
        view = arrays.dlpack_view(obj, "x")
        cai = view.__cuda_array_interface__
        assert cai["data"][0] == a.ctypes.data          # the producer's buffer, not a copy
        assert tuple(cai["shape"]) == (2, 3, 4) and cai["typestr"] == "<f4"


def test_host_dlpack_object_is_not_a_cuda_array_and_is_refused_as_one():
    obj = DLPackOnly(np.zeros(3, np.float32), device_type=dlpack.KDL_CPU)
    assert not arrays.is_cuda_array(obj)
    with pytest.raises(ValueError, match=r"x: expected a CUDA tensor"):
        arrays.dlpack_view(obj, "x")


def test_capsule_reader_refuses_non_float_and_reports_strides():
    ints = np.zeros(4, np.int32)
    cap = dlpack.capsule_from_buffer(ints, ints.ctypes.data, ints.shape, dlpack.KDL_CUDA)
    info = dlpack.capsule_info(cap)          # the writer always says float32 ...
    assert info["typestr"] == "<f4" and info["strides"] is None and info["shape"] == (4,)
    assert dlpack.is_compact((2, 3), (3, 1)) and not dlpack.is_compact((2, 3), (1, 2))
    assert dlpack.is_compact((1, 3), (99, 1))  # a size-1 axis may carry any stride


def test_exported_capsule_keeps_its_owner_until_consumed_or_dropped():
    import gc

    a = np.ones(5, np.float32)
    n = len(dlpack._EXPORTED)
    cap = dlpack.capsule_from_buffer(a, a.ctypes.data, a.shape, dlpack.KDL_CPU)
    assert len(dlpack._EXPORTED) == n + 1
    del cap  # never consumed: its destructor releases our reference
    gc.collect()
    assert len(dlpack._EXPORTED) == n
