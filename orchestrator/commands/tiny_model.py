"""`orch tiny-model DIR`: write a tiny random-weight checkpoint (no download)."""
from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.errors import OrchError, RuntimeFailure


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `orch tiny-model`."""
    p = sub.add_parser("tiny-model", help="write a tiny random-weight model checkpoint",
                       description="Write a tiny random-weight Hugging Face checkpoint (config.json, "
                       "model.safetensors, tokenizer.json) to DIR, for trying orch without a download. "
                       "An existing checkpoint in DIR is replaced; any other non-empty DIR is refused.")
    p.add_argument("dir", metavar="DIR", help="output directory")
    p.add_argument("--arch", choices=["llama", "mistral", "qwen2"], default="llama", help="model family")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the checkpoint and print its path."""
    out = Path(args.dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise OrchError(f"{out}: exists and is not a model checkpoint directory; refusing to overwrite it")
    from workers.models.tiny import write_random_checkpoint

    try:
        path = write_random_checkpoint(out, arch=args.arch, seed=args.seed)
    except OSError as e:
        raise RuntimeFailure(f"{out}: cannot write the checkpoint: {e}") from None
    print(f"wrote a tiny random {args.arch} checkpoint to {path}")
    return 0
