"""`orch generate`: send one prompt to a running orch server and print the answer."""
from __future__ import annotations

import argparse
import json
import sys

HELP = """\
Send one prompt (text, or token ids) to an orch server's orch.v1 API and print the completion.
Decoding is greedy unless --temperature > 0. With --stream the text is printed as it is generated.
--json prints the token ids, text, finish reason and usage as JSON (with --stream: one JSON object
per streamed message, then a last one with the whole result).
"""


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="send a prompt to a running server", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", required=True, metavar="HOST:PORT", help="the server's gRPC address")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text (tokenized by the server)")
    src.add_argument("--prompt-ids", type=_ids, metavar="1,2,3", help="prompt as comma-separated token ids")
    p.add_argument("--max-tokens", type=int, default=16, metavar="N", help="most tokens to generate (default 16)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest (0 = all)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus mass in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed: same seed, same output")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R", help="> 1 discourages repeats")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--stop-token-id", type=int, action="append", default=[], metavar="ID",
                   help="stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="return each chosen token's log-probability and the top N alternatives")
    p.add_argument("--model", default="", help="served model name (default: the server's only model)")
    p.add_argument("--stream", action="store_true", help="stream the answer as it is generated")
    p.add_argument("--json", action="store_true", help="print token ids, text, finish reason and usage as JSON")
    p.add_argument("--tls-ca", metavar="PEM", default=None,
                   help="connect over TLS, trusting this CA certificate file ('' = the system's roots)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="give up after S seconds (default 300)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from orchestrator.client import Completion, OrchClient

    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              seed=args.seed, repetition_penalty=args.repetition_penalty, stop=args.stop,
              stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos, model=args.model,
              logprobs=args.logprobs is not None, top_logprobs=args.logprobs or 0)
    with OrchClient(args.endpoint, timeout=args.timeout, tls_ca=args.tls_ca) as client:
        if not args.stream:
            c = client.generate(args.prompt, args.prompt_ids, **kw)
            print(json.dumps(c.to_dict(), ensure_ascii=False) if args.json else c.text)
            return 0
        whole = Completion()
        for part in client.stream(args.prompt, args.prompt_ids, **kw):
            if args.json:
                print(json.dumps(part.to_dict(), ensure_ascii=False), flush=True)
            else:
                sys.stdout.write(part.text)
                sys.stdout.flush()
            whole.token_ids += part.token_ids
            whole.text += part.text
            whole.logprobs += part.logprobs
            if part.finish_reason:
                for k in ("request_id", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens",
                          "cached_prompt_tokens"):
                    setattr(whole, k, getattr(part, k))
        print(json.dumps(whole.to_dict(), ensure_ascii=False) if args.json else "")
    return 0
