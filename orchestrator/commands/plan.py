"""`orch plan FILE [--json]`: show where every rank runs and how its memory is spent."""
from __future__ import annotations

import argparse
import json

from orchestrator.commands.validate import SHAPE_ONLY_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `orch plan`."""
    p = sub.add_parser("plan", help="show the placement and memory plan of a topology",
                       description="Validate a topology and print its plan: rank -> node/GPU, the converting node, "
                       "layer ranges per pipeline stage, per-GPU memory (weights, activations, KV cache) and the "
                       "resulting concurrent-token capacity. The plan has a content hash.",
                       epilog="Exit codes: 0 ok, 2 invalid input (including a model that does not fit), "
                       "1 runtime failure. Memory figures are estimates; see orchestrator/plan.py.")
    p.add_argument("file", metavar="FILE", help="topology YAML file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (with content_hash)")
    p.add_argument("--shape-only", action="store_true", help=SHAPE_ONLY_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate, plan and print."""
    from orchestrator.localhost import detect_local_gpus
    from orchestrator.validation import load_and_validate

    _, _, plan = load_and_validate(args.file, shape_only=args.shape_only, local_gpus=detect_local_gpus())
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, sort_keys=True))
    else:
        from rich.console import Console

        Console().print(plan.render_table())
    return 0
