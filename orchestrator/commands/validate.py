"""`orch validate FILE`: check a topology file, its model and its nodes without starting anything."""
from __future__ import annotations

import argparse

from orchestrator.topology import schema_reference

SHAPE_ONLY_HELP = ("check against config.json alone: the model directory need not hold weights or a "
                   "tokenizer (for planning a big model before downloading it)")
EPILOG = f"""\
A topology error is printed as FILE:LINE: KEY.PATH: PROBLEM and exits with code 2.
Exit codes: 0 valid, 2 invalid input, 1 runtime failure.

Topology keys:
{schema_reference()}
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `orch validate`."""
    p = sub.add_parser("validate", help="check a topology YAML file",
                       description="Check a topology YAML file: syntax, keys and types, the model checkpoint "
                       "(config.json, *.safetensors, tokenizer.json), how heads and layers split over tensor x "
                       "pipeline, the GPUs on the listed nodes, the converting node and whether the model fits.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="topology YAML file")
    p.add_argument("--shape-only", action="store_true", help=SHAPE_ONLY_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate and print a one-line summary."""
    from orchestrator.localhost import detect_local_gpus
    from orchestrator.validation import load_and_validate

    topo, cfg, plan = load_and_validate(args.file, shape_only=args.shape_only, local_gpus=detect_local_gpus())
    print(f"{args.file}: ok: {topo.name}: {cfg.architecture} ({cfg.num_layers} layers) {topo.model.dtype}, "
          f"tensor {plan.tensor} x pipeline {plan.pipeline} on {plan.device}, "
          f"{plan.max_concurrent_tokens} KV tokens")
    return 0
