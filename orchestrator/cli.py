"""`orch` command line: one subcommand per module in orchestrator/commands/."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from orchestrator.errors import OrchError

# command names; the module is orchestrator.commands.<name with '-' -> '_'> exposing add_parser(subparsers)
COMMANDS = ["validate", "plan", "tiny-model", "convert", "build", "serve", "generate", "apply", "status", "delete", "smoke", "bench"]

DESCRIPTION = """\
orch: build and serve large language models on a cluster of NVIDIA GPUs (or on CPU).

A topology YAML file names the model, its tensor/pipeline parallelism, the nodes and the
build and serve settings. `orch apply FILE` converts the weights, builds one engine per
shard and starts a gRPC serving mesh; `orch generate` talks to it.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orch", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = f"orchestrator.commands.{name.replace('-', '_')}"
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # command not present in this build
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except OrchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
