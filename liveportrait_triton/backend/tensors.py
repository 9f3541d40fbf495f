"""Tensors crossing the Python backend's boundary (DLPack interop with the bundled stub).

Host arrays are NumPy; device-resident tensors (the pipeline's source state and the W -> G hand-over when the
sub-networks run on a GPU) are torch tensors, which share memory with `pb_utils.Tensor` through DLPack in both
directions, on the GPU as on the CPU.
"""
from __future__ import annotations

import ctypes

import numpy as np

from ..arrays import is_torch

_USED_CAPSULE_NAME = b"used_dltensor"       # the DLPack protocol's name of a consumed capsule (kept alive here)
_capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
_capsule_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_set_name.restype = ctypes.c_int


# The bundled stub (Triton 2.51's Python backend) was built against NumPy 1: under NumPy 2 its NumPy bridges read
# the item size at the old C-struct offset, so `pb_utils.Tensor(name, ndarray)` records 0 bytes and
# `Tensor.as_numpy()` repeats the first element. DLPack carries the same memory without those bridges, so every
# tensor crosses the backend boundary through these functions.

def backend_array(tensor) -> np.ndarray:
    """A NumPy view of a `pb_utils.Tensor` in CPU memory (valid while the request or response that holds it lives)."""
    return np.from_dlpack(tensor)


def backend_torch(tensor):
    """A torch view of a `pb_utils.Tensor` in CPU or GPU memory, on the tensor's device (no copy)."""
    import torch
    return torch.from_dlpack(tensor)


def backend_value(tensor):
    """A request's input where it lies: NumPy in CPU memory, torch on the GPU (inputs of a GPU sub-network)."""
    return backend_array(tensor) if tensor.is_cpu() else backend_torch(tensor)


def backend_tensor(pb_utils, name: str, value):
    """A `pb_utils.Tensor` over a NumPy array or a torch tensor (CPU or GPU), passed through DLPack (no copy of a
    C-contiguous value).

    The stub marks the capsule it consumed 'used_dlpack' instead of the protocol's 'used_dltensor'; renaming it
    lets the producer's capsule destructor see a consumed capsule instead of reporting an error for every tensor.
    """
    capsule = (value.contiguous() if is_torch(value) else np.ascontiguousarray(value)).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    _capsule_set_name(capsule, _USED_CAPSULE_NAME)
    return tensor
