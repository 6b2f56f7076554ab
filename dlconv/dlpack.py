"""DLPack without a framework: read a DLPack capsule, and wrap our buffers in one.

The installed numba-cuda has no DLPack import/export of its own, so this small ctypes
reader/writer is how dlconv takes CUDA tensors that only speak DLPack (and how the
TensorFlow bridge hands our device outputs to TensorFlow).  A capsule is read without
being consumed: :class:`CudaView` holds it (hence the producer's memory) and exposes the
buffer through ``__cuda_array_interface__``, which Numba understands.  Nothing is copied.
"""

from __future__ import annotations

import ctypes

# The DLPack structs (dlpack.h, v0.x ABI, which TensorFlow produces and consumes).
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                             ("deleter", _DELETER)]

KDL_CPU, KDL_CUDA, KDL_CUDA_MANAGED = 1, 2, 13
_KDL_FLOAT = 2
_CAPSULE_NAME = b"dltensor"

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule_ptr = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_ptr.restype = ctypes.c_void_p
_capsule_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]

#: Exported tensors still owned by a consumer: address of the struct → (struct, shape
#: array, owner).  The deleter removes the entry, which releases our buffer.
_EXPORTED = {}


@_DELETER
def _release(managed):
    # Called by the consumer (possibly from one of its threads; ctypes takes the GIL).
    try:
        _EXPORTED.pop(ctypes.addressof(managed.contents), None)
    except Exception:  # interpreter shutdown: the registry may already be gone
        pass


def capsule_info(capsule):
    """Read a DLPack capsule (not consuming it) → dict(ptr, shape, strides, typestr, device).

    ``strides`` is in elements, or None for a compact row-major tensor.
    """
    addr = _capsule_ptr(capsule, _CAPSULE_NAME)
    t = _DLManagedTensor.from_address(addr).dl_tensor
    if t.dtype.code != _KDL_FLOAT or t.dtype.lanes != 1:
        raise TypeError(f"DLPack tensor has dtype code {t.dtype.code} x{t.dtype.lanes}; "
                        "dlconv takes float32 only")
    shape = tuple(t.shape[i] for i in range(t.ndim))
    strides = None if not t.strides else tuple(t.strides[i] for i in range(t.ndim))
    return {"ptr": (t.data or 0) + t.byte_offset, "shape": shape, "strides": strides,
            "typestr": f"<f{t.dtype.bits // 8}", "device": (t.device.device_type, t.device.device_id)}


# A capsule nobody consumed (a consumer renames it "used_dltensor") releases our buffer
# when it dies, as the DLPack protocol asks of producers.
_capsule_is_valid = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_IsValid", ctypes.pythonapi))
_capsule_ptr_raw = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _capsule_destructor(capsule):
    try:
        if _capsule_is_valid(capsule, _CAPSULE_NAME):
            _EXPORTED.pop(_capsule_ptr_raw(capsule, _CAPSULE_NAME), None)
    except Exception:  # interpreter shutdown: the registry may already be gone
        pass


def capsule_from_buffer(owner, ptr: int, shape, device_type: int, device_id: int = 0):
    """Wrap a compact row-major float32 buffer at ``ptr`` in a DLPack capsule.

    ``owner`` (the array owning the memory) is kept alive until the consumer calls the
    deleter, or until the capsule dies unconsumed; the buffer is never copied.
    """
    m = _DLManagedTensor()
    shp = (ctypes.c_int64 * max(len(shape), 1))(*shape)
    m.dl_tensor.data = ptr
    m.dl_tensor.device = _DLDevice(device_type, device_id)
    m.dl_tensor.ndim = len(shape)
    m.dl_tensor.dtype = _DLDataType(_KDL_FLOAT, 32, 1)
    m.dl_tensor.shape = ctypes.cast(shp, ctypes.POINTER(ctypes.c_int64))
    m.dl_tensor.strides = None  # compact row-major
    m.dl_tensor.byte_offset = 0
    m.manager_ctx = None
    m.deleter = _release
    addr = ctypes.addressof(m)
    _EXPORTED[addr] = (m, shp, owner)
    return _capsule_new(addr, _CAPSULE_NAME, ctypes.cast(_capsule_destructor, ctypes.c_void_p))


class CudaView:
    """A CUDA DLPack tensor seen through ``__cuda_array_interface__`` (no copy).

    Holds the capsule (hence the producer's memory) for as long as it lives.  Refuses a
    tensor that is not in CUDA memory or not compact row-major, naming ``name``.
    """

    def __init__(self, capsule, name: str = "tensor"):
        self._capsule = capsule
        info = capsule_info(capsule)
        if info["device"][0] not in (KDL_CUDA, KDL_CUDA_MANAGED):
            raise ValueError(f"{name}: expected a CUDA tensor, got DLPack device {info['device']}")
        if info["strides"] is not None and not is_compact(info["shape"], info["strides"]):
            raise ValueError(f"{name} must be C-contiguous (row-major), got DLPack strides "
                             f"{info['strides']} for shape {info['shape']}")
        self.device_id = info["device"][1]
        self.__cuda_array_interface__ = {"shape": info["shape"], "typestr": info["typestr"],
                                         "data": (info["ptr"], False), "strides": None,
                                         "version": 3, "stream": None}


def is_compact(shape, strides):
    expect = 1
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != expect:
            return False
        expect *= n
    return True
