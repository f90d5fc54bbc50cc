"""Benchmark weight conversion: peak RSS and throughput for a Llama-3.1-8B-shape checkpoint.

Generates (unless --model is given) a random bf16 checkpoint of the 8B shape, written streaming so
it never needs the model in memory (--layers shrinks it), then converts it in a fresh subprocess
and reports that process's peak RSS (VmHWM), wall time and GB/s; then times the no-op rerun.

    python benchmarks/bench_convert.py --layers 4 --tp 2 --pp 2 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}

CHILD = """
import json, sys, time
from pathlib import Path
from workers.checkpoint import hash_sources, open_checkpoint
from workers.convert import HASH_CACHE, convert_checkpoint
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
before = hwm()
t0 = time.perf_counter()
hash_sources(open_checkpoint(sys.argv[1]).source_files(), Path(sys.argv[2]).parent / HASH_CACHE)
t1 = time.perf_counter()
res = convert_checkpoint(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), dtype=sys.argv[5])
t2 = time.perf_counter()
print(json.dumps({"hash_s": t1 - t0, "seconds": t2 - t1, "bytes": res.bytes_written, "before": before,
                  "peak": hwm(), "converted": len(res.converted), "noop": res.noop}))
"""


def write_checkpoint(out: Path, layers: int, seed: int = 0) -> int:
    """Write config.json, a tokenizer and a random bf16 model.safetensors tensor by tensor; returns bytes."""
    import torch

    from workers.convert import OutTensor, safetensors_header
    from workers.layout import required_sources, source_shape
    from workers.models.config import parse_model_config
    from workers.models.tiny import write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    raw = {**LLAMA31_8B, "num_hidden_layers": layers}
    cfg = parse_model_config(raw)
    specs = [OutTensor(n, source_shape(cfg, n), torch.bfloat16) for n in required_sources(cfg)]
    header, offsets = safetensors_header(specs)
    gen = torch.Generator().manual_seed(seed)
    with open(out / "model.safetensors", "wb") as f:
        f.write(header)
        for s in specs:
            rows_per = max(1, (64 << 20) // (2 * (s.shape[1] if len(s.shape) > 1 else 1)))
            for r0 in range(0, s.shape[0], rows_per):
                n = min(rows_per, s.shape[0] - r0)
                t = torch.randn((n, *s.shape[1:]), generator=gen).mul_(0.02).to(torch.bfloat16)
                f.write(t.view(torch.uint8).numpy().tobytes())
            assert f.tell() == offsets[s.name][1]
    (out / "config.json").write_text(json.dumps(raw, indent=1))
    write_tokenizer(out, 1000)
    return offsets[specs[-1].name][1]


def run_child(model: Path, out: Path, tp: int, pp: int, dtype: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), str(tp), str(pp), dtype],
                       cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"conversion failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an existing checkpoint directory (default: generate one)")
    ap.add_argument("--layers", type=int, default=32, help="layers of the generated 8B-shape model (32 = full)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/orch-bench-convert"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and shards")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()

    model = args.model
    gen_s = None
    if model is None:
        model = args.workdir / f"llama8b-shape-{args.layers}l"
        if not (model / "config.json").is_file():
            t = time.perf_counter()
            size = write_checkpoint(model, args.layers)
            gen_s = time.perf_counter() - t
            print(f"generated {model} ({size / 1e9:.2f} GB) in {gen_s:.1f} s", file=sys.stderr)
    src_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    out = args.workdir / "shards"
    shutil.rmtree(out, ignore_errors=True)
    (args.workdir / ".source-hashes.json").unlink(missing_ok=True)  # first run hashes the sources too
    first = run_child(model, out, args.tp, args.pp, args.dtype)
    again = run_child(model, out, args.tp, args.pp, args.dtype)
    largest = 128256 * 4096 * 2
    result = {
        "model": str(model), "source_gb": src_bytes / 1e9, "tp": args.tp, "pp": args.pp, "dtype": args.dtype,
        "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()[0], "source_hash_s": first["hash_s"],
        "source_hash_gb_per_s": src_bytes / 1e9 / first["hash_s"], "convert_s": first["seconds"], "written_gb": first["bytes"] / 1e9,
        "read_gb_per_s": src_bytes / 1e9 / first["seconds"], "write_gb_per_s": first["bytes"] / 1e9 / first["seconds"],
        "rss_before_mb": first["before"] / 1e6, "peak_rss_mb": first["peak"] / 1e6,
        "extra_rss_mb": (first["peak"] - first["before"]) / 1e6, "largest_tensor_mb": largest / 1e6,
        "noop_rerun_s": again["seconds"], "noop": again["noop"],
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"source {result['source_gb']:.2f} GB hashed in {result['source_hash_s']:.1f} s "
              f"({result['source_hash_gb_per_s']:.2f} GB/s; cached for later runs)\n"
              f"-> tp={args.tp} pp={args.pp} {args.dtype}: {result['written_gb']:.2f} GB written in "
              f"{result['convert_s']:.1f} s ({result['read_gb_per_s']:.2f} GB/s of source, "
              f"{result['write_gb_per_s']:.2f} GB/s written; {os.cpu_count()} CPUs, load {result['load_avg']:.1f})\n"
              f"peak RSS {result['peak_rss_mb']:.0f} MB ({result['extra_rss_mb']:.0f} MB above the "
              f"{result['rss_before_mb']:.0f} MB after imports; largest tensor {largest / 1e6:.0f} MB)\n"
              f"no-op rerun: {result['noop_rerun_s']:.2f} s (noop={result['noop']})")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        if args.model is None:
            shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    main()
