"""`orch smoke [FILE]`: the whole pipeline on this machine, checked against the CPU reference."""
from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

HELP = """\
Run the whole pipeline (convert, build, serve over Ray) on this machine and check the served
greedy tokens against the CPU reference engine, then tear everything down. Exit 0 when the tokens
match, 1 otherwise: the command a CI job runs on a single GPU.

Without FILE a tiny random-weight Llama is written to a temporary directory and served with
`device: auto` (the GPU when there is one) in float32. With FILE, that topology is applied (its
model is also run on the CPU reference, so keep it small) and its first tokens are compared.
"""

_TOPOLOGY = """\
name: {name}
model:
  path: {model}
  dtype: float32
parallelism:
  tensor: 1
  pipeline: 1
device: auto
build:
  artifacts: {artifacts}
serve:
  host: 127.0.0.1
  port: {port}
  metrics_port: {metrics_port}
  max_num_seqs: 8
  max_seq_len: 512
  max_num_batched_tokens: 256
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("smoke", help="end-to-end check of the pipeline on this machine", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", help="topology to check (default: a tiny random model)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local head)")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare (default 16)")
    p.set_defaults(func=run)


def reference_tokens(model_dir: Path, work: Path, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens of the CPU reference engine (float32, one rank) served in this process."""
    from orchestrator.client import OrchClient
    from workers.convert import convert_checkpoint
    from workers.server import ServerConfig, ServerThread

    convert_checkpoint(model_dir, work / "ref-shards", 1, 1, "float32")
    server = ServerThread(ServerConfig(shard_dir=work / "ref-shards", port=0, metrics_port=None, device="cpu",
                                       num_kv_blocks=64, max_seq_len=512))
    try:
        with OrchClient(f"127.0.0.1:{server.port}", timeout=120) as c:
            return c.generate(prompt_ids=prompt_ids, max_tokens=n, ignore_eos=True).token_ids
    finally:
        server.stop()


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from orchestrator.client import OrchClient
    from orchestrator.commands.apply import apply_file
    from orchestrator.commands.delete import delete_deployment
    from orchestrator.topology import load_topology
    from workers.dist import free_port
    from workers.models.tiny import write_random_checkpoint

    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="orch-smoke-") as tmp:
        work = Path(tmp)
        if args.file:
            path = Path(args.file)
        else:
            model = write_random_checkpoint(work / "model", seed=random.randrange(1 << 30))
            path = work / "smoke.yaml"
            path.write_text(_TOPOLOGY.format(name=f"smoke-{random.randrange(1 << 20):05x}", model=model,
                                             artifacts=work / "artifacts", port=free_port(),
                                             metrics_port=free_port()))
        topo = load_topology(path)
        result = apply_file(str(path), args.address, console)
        try:
            vocab = min(topo_vocab(topo), 30000)
            rng = random.Random(0)
            prompt = [rng.randrange(3, vocab) for _ in range(12)]
            with OrchClient(result["endpoint"], timeout=300) as c:
                served = c.generate(prompt_ids=prompt, max_tokens=args.tokens, ignore_eos=True).token_ids
        finally:
            delete_deployment(topo.name, args.address)
        expected = reference_tokens(topo.model.path, work, prompt, args.tokens)
    same = sum(1 for a, b in zip(served, expected) if a == b)
    if served == expected:
        console.print(f"[green]PASS[/]: {len(served)} greedy tokens equal the CPU reference")
        return 0
    console.print(f"[red]FAIL[/]: served {served}\n      reference {expected} ({same}/{len(expected)} equal)")
    return 1


def topo_vocab(topo) -> int:
    from workers.models.config import load_model_config

    return load_model_config(topo.model.path).vocab_size
