"""Every kernel variant an engine uses compiles with NVRTC for sm_90, here, without a GPU (NVRTC is a
compiler library): kernel source errors show up in CI instead of on the GPU machine."""
from __future__ import annotations

import ctypes
import glob
import os

import pytest
import torch

from workers.build import kernel_specs
from workers.kernels._nvrtc import OPTIONS, spec, target
from workers.models.config import parse_model_config

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}


def _libnvrtc():
    try:
        import nvidia.cuda_nvrtc as pkg   # the nvidia-cuda-nvrtc-cu12 wheel (test extra)
    except ImportError:
        pytest.skip("no NVRTC library (pip install nvidia-cuda-nvrtc-cu12)")
    libs = sorted(glob.glob(os.path.join(list(pkg.__path__)[0], "lib", "libnvrtc.so.*")))
    if not libs:
        pytest.skip("the nvidia-cuda-nvrtc package has no libnvrtc.so")
    return ctypes.CDLL(libs[0])


def _variants():
    specs = []
    for dt in ("bfloat16", "float16", "float32"):
        cfg = parse_model_config(LLAMA_8B).to_dict()
        specs += kernel_specs(cfg, 1, dt, "sm_90")
        specs += [s for s in kernel_specs(cfg, 1, dt, "sm_80") if s.family == "skinny_gemm"]   # (GPUs without wgmma)
    specs += [spec("paged_attention", torch.float32, HD=64, GROUP=g) for g in (1, 2, 8)]
    return specs


@pytest.mark.parametrize("s", _variants(), ids=lambda s: f"{s.family}-{'-'.join(f'{k}{v}' for k, v in s.defines)}")
def test_kernel_compiles_for_sm90(s):
    lib = _libnvrtc()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), s.source().encode(), f"{s.family}.cu".encode(), 0,
                                  None, None) == 0
    try:
        opts = [f"--gpu-architecture={target(s, 'sm_90')}".encode(), *(o.encode() for o in OPTIONS)]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert rc == 0, log.value.decode()
        cubin = ctypes.c_size_t()
        assert lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin)) == 0 and cubin.value > 0
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
