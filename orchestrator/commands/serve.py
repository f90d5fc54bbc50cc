"""`orch serve`: run one gRPC server on this machine from converted shards, without Ray."""
from __future__ import annotations

import argparse
import logging

HELP = """\
Run one orch server on this machine (no Ray), for debugging and single-node use. Give either a
topology FILE (its checkpoint is converted first if needed, and its serve section sets the
defaults) or --shards DIR: a directory written by `orch convert` (the shard root, a tp{T}-pp{P}
directory or a rank directory) or by `orch build` (engine directories load like shards).
With tensor/pipeline parallelism > 1 the other ranks start as local processes. The server
answers orch.v1.OrchService, KServe v2 inference.GRPCInferenceService, grpc.health.v1 and server
reflection on HOST:PORT and serves Prometheus metrics on the metrics port. Stop it with Ctrl-C.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one gRPC server on this machine (no Ray)", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", metavar="FILE", help="topology YAML file")
    p.add_argument("--shards", metavar="DIR", help="converted shards or built engines to serve (instead of FILE)")
    p.add_argument("--model-name", metavar="NAME", help="served model name (default: the topology's name, or 'model')")
    p.add_argument("--host", help="address to listen on (default: serve.host, or 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default: serve.port, or 50051; 0 = any free port)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default: serve.metrics_port, or port + 1000)")
    p.add_argument("--no-metrics", action="store_true", help="do not export Prometheus metrics")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs (default: auto)")
    p.add_argument("--max-num-seqs", type=int, metavar="N", help="sequences running at once")
    p.add_argument("--max-seq-len", type=int, metavar="N", help="prompt + generated tokens per sequence")
    p.add_argument("--max-num-batched-tokens", type=int, metavar="N", help="tokens per engine step")
    p.add_argument("--block-size", type=int, metavar="N", help="tokens per KV-cache block")
    p.add_argument("--num-kv-blocks", type=int, metavar="N", help="KV-cache blocks (default: from --kv-cache-fraction)")
    p.add_argument("--kv-cache-fraction", type=float, metavar="F",
                   help="share of (GPU) memory for weights and KV cache, in (0, 1]")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prompt prefixes")
    p.add_argument("--max-message-mb", type=float, default=4.0, metavar="MB",
                   help="largest gRPC message accepted (default 4)")
    p.set_defaults(func=run)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def server_config(args: argparse.Namespace):
    """The ServerConfig of the command line (and topology file), converting the checkpoint if needed."""
    from pathlib import Path

    from orchestrator.errors import OrchError
    from workers.server import ServerConfig

    if bool(args.file) == bool(args.shards):
        raise OrchError("orch serve: give a topology FILE or --shards DIR (one of them)")
    vals: dict = {}
    if args.file:
        from orchestrator.commands.convert import convert_topology
        from orchestrator.topology import load_topology

        topo = load_topology(args.file)
        tp, pp = topo.parallelism.tensor, topo.parallelism.pipeline
        root, _ = convert_topology(topo)
        s = topo.serve
        vals = dict(shard_dir=root / f"tp{tp}-pp{pp}", model_name=topo.name, host=s.host, port=s.port,
                    metrics_port=s.metrics_port, device=topo.device, max_num_seqs=s.max_num_seqs,
                    max_seq_len=s.max_seq_len, max_num_batched_tokens=s.max_num_batched_tokens,
                    block_size=s.block_size, kv_cache_fraction=s.kv_cache_fraction)
    else:
        vals = dict(shard_dir=Path(args.shards), device="auto")
    for flag, key in (("model_name", "model_name"), ("host", "host"), ("port", "port"),
                      ("metrics_port", "metrics_port"), ("device", "device"), ("max_num_seqs", "max_num_seqs"),
                      ("max_seq_len", "max_seq_len"), ("max_num_batched_tokens", "max_num_batched_tokens"),
                      ("block_size", "block_size"), ("num_kv_blocks", "num_kv_blocks"),
                      ("kv_cache_fraction", "kv_cache_fraction")):
        if getattr(args, flag) is not None:
            vals[key] = getattr(args, flag)
    for key in ("max_num_seqs", "max_seq_len", "max_num_batched_tokens", "block_size", "num_kv_blocks"):
        if key in vals and vals[key] is not None and vals[key] < 1:
            raise OrchError(f"--{key.replace('_', '-')} must be a positive integer, got {vals[key]}")
    if "kv_cache_fraction" in vals and not 0 < vals["kv_cache_fraction"] <= 1:
        raise OrchError(f"--kv-cache-fraction must be in (0, 1], got {vals['kv_cache_fraction']}")
    port = vals.get("port", 50051)
    if args.no_metrics:
        vals["metrics_port"] = None
    elif vals.get("metrics_port") is None:
        vals["metrics_port"] = 0 if port == 0 else (port + 1000 if port + 1000 <= 65535 else port - 1000)
    vals["device"] = _device(vals.get("device", "auto"))
    vals["max_message_bytes"] = int(args.max_message_mb * (1 << 20))
    vals["enable_prefix_caching"] = not args.no_prefix_caching
    return ServerConfig(**vals, **ServerConfig.tls_from_env())


def run(args: argparse.Namespace) -> int:
    from workers.server import run_server

    cfg = server_config(args)
    logging.getLogger(__name__).info("serving %s from %s on %s", cfg.model_name, cfg.shard_dir, cfg.device)
    run_server(cfg)
    return 0
