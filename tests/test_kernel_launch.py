"""The kernel launcher's host side, without a GPU: the argument array cuLaunchKernelEx reads."""
from __future__ import annotations

import ctypes

import numpy as np
import torch

from workers.kernels._nvrtc import TensorMapArg, f32, i32, i64, kernel_params, ptr


def test_kernel_params_point_at_each_argument_as_the_kernel_reads_it():
    """The kernelParams array handed to cuLaunchKernelEx: element i points at argument i, stored with its C
    type and alignment (read back here through the pointers, as the driver reads them)."""
    x = torch.arange(6, dtype=torch.float32)
    args = (ptr(x), i32(-7), ptr(None), i64(-(2 ** 40) - 3), f32(0.1), i32(2 ** 31 - 1), ptr(x), f32(-3.5e-8))
    readers = (ctypes.c_uint64, ctypes.c_int32, ctypes.c_uint64, ctypes.c_int64, ctypes.c_float, ctypes.c_int32,
               ctypes.c_uint64, ctypes.c_float)
    params, values = kernel_params(args)
    assert params.dtype == np.uint64 and params.shape == (len(args),)
    for p, a, r in zip(params, args, readers):
        assert int(p) % ctypes.sizeof(r) == 0                     # aligned as a kernel parameter of that type
        got = r.from_address(int(p)).value
        assert got == (a.item() if r is not ctypes.c_float else np.float32(a).item())
    assert kernel_params(())[0].shape == (0,)
    del values


def test_kernel_params_carry_tensor_maps_by_value():
    """A 128-byte tensor map between other arguments: its pointer reaches all 128 bytes, the others still
    read back (the driver copies each value to its place in the kernel's parameters)."""
    blob = TensorMapArg(bytes(range(128)))
    params, values = kernel_params((blob, i32(5), TensorMapArg(bytes(128 * [7])), ptr(None)))
    assert ctypes.string_at(int(params[0]), 128) == bytes(range(128))
    assert ctypes.c_int32.from_address(int(params[1])).value == 5
    assert ctypes.string_at(int(params[2]), 128) == bytes(128 * [7])
    assert ctypes.c_uint64.from_address(int(params[3])).value == 0
    del values


def test_launch_config_is_built_once_per_geometry_and_stream():
    """The cached launch configuration carries the grid and block (padded to 3 dims), shared memory, stream
    and the one PDL attribute; the same geometry on the same stream gets the same object, others a new one."""
    from workers.kernels._nvrtc import _PROGRAMMATIC_STREAM_SERIALIZATION, launch_config

    a = launch_config((8, 64, 4), (128,), 4096, 1234)
    assert list(a.grid) == [8, 64, 4] and list(a.block) == [128, 1, 1]
    assert a.shared_mem == 4096 and a.stream == 1234 and a.num_attrs == 1
    assert a.attrs[0].id == _PROGRAMMATIC_STREAM_SERIALIZATION
    assert ctypes.string_at(ctypes.addressof(a.attrs[0]), 16).hex() == "06000000" + "00" * 4 + "01000000" + "00" * 4
    assert launch_config((8, 64, 4), (128,), 4096, 1234) is a
    b = launch_config((8, 64, 5), (128,), 4096, 1234)
    assert b is not a and list(b.grid) == [8, 64, 5]
    assert launch_config((8, 64, 4), (128,), 4096, 999) is not a
