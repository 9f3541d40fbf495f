"""Batch operations on tensors wherever they live: NumPy arrays on the host, torch tensors on a device.

The pipeline keeps per-sequence source state and the W -> G hand-over in the memory the sub-networks run in
(torch tensors when a runner keeps them device-resident); these helpers let the same per-frame code stack and
slice either kind without moving data.
"""
from __future__ import annotations

import numpy as np


def is_torch(value) -> bool:
    """Whether value is a torch tensor (device-resident data) rather than a NumPy array (host data)."""
    return type(value).__module__.startswith("torch")


def concatenate(values: list):
    """Stack a batch along axis 0 where the values live (torch.cat for torch tensors, else NumPy)."""
    if is_torch(values[0]):
        import torch
        return torch.cat(values)
    return np.concatenate(values)


def batch_item(value, index: int):
    """Item `index` of a batch as its own (1, ...) tensor, so that keeping it does not keep the whole batch."""
    item = value[index:index + 1]
    return item.clone() if is_torch(item) else item.copy()


def nbytes(value) -> int:
    """Bytes held by a NumPy array or a torch tensor."""
    return int(value.numel() * value.element_size()) if is_torch(value) else int(value.nbytes)
