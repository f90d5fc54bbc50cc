"""A step's integer metadata to the GPU in one copy.

An eager step needs about ten small index tensors (token ids, positions, cache slots, block tables...).
Made one by one with `torch.tensor(..., device="cuda")`, each is a pageable host-to-device copy that
blocks the host (a profile of a 240 + 128-token step had them at ~3 ms of its ~20 ms of host work).
`Uploader` packs them into one reused pinned buffer and issues a single non-blocking copy; the tensors
handed back are views of one device allocation. (The decode CUDA graphs keep their own static buffers.)
"""
from __future__ import annotations

import numpy as np
import torch


class Uploader:
    """Packs int64 and int32 arrays into pinned memory and copies them to `device` in one go."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._host: torch.Tensor | None = None        # pinned uint8, grown as needed
        self._copied: torch.cuda.Event | None = None  # the last copy has read the pinned buffer

    def upload(self, i64: list[np.ndarray], i32: list[np.ndarray]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Device tensors equal to the given arrays (same shapes), int64 ones then int32 ones."""
        n64, n32 = sum(a.size for a in i64), sum(a.size for a in i32)
        off32 = n64 * 8
        nbytes = off32 + n32 * 4
        if self._copied is not None:
            self._copied.synchronize()   # the previous step's copy is done with the staging buffer
        if self._host is None or self._host.numel() < nbytes:
            self._host = torch.empty(max(nbytes, 2 * (0 if self._host is None else self._host.numel()), 4096),
                                     dtype=torch.uint8, pin_memory=True)
        h64 = self._host[:off32].view(torch.int64).numpy()
        h32 = self._host[off32:nbytes].view(torch.int32).numpy()
        _fill(h64, i64)
        _fill(h32, i32)
        dev = self._host[:nbytes].to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return _views(dev[:off32].view(torch.int64), i64), _views(dev[off32:nbytes].view(torch.int32), i32)


def _fill(dst: np.ndarray, parts: list[np.ndarray]) -> None:
    at = 0
    for a in parts:
        dst[at:at + a.size] = a.reshape(-1)
        at += a.size


def _views(flat: torch.Tensor, parts: list[np.ndarray]) -> list[torch.Tensor]:
    out, at = [], 0
    for a in parts:
        out.append(flat[at:at + a.size].view(a.shape))
        at += a.size
    return out
