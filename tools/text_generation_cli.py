"""Talk to a running text generation server: one prompt per line on stdin until EOF.

    python tools/text_generation_cli.py 127.0.0.1:5000 --tokens-to-generate 32 --early-exit --thres 0.8
    echo "def fib(n):" | python tools/text_generation_cli.py localhost:5000 --top-k 1 --show-exits

Each line goes to PUT /api; the generation is printed, then (with --show-exits) the layer
every token left at. A refused request prints the server's message and the loop goes on.
Needs only the standard library.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("server", help="host:port of tools/run_text_generation_server.py")
    p.add_argument("--tokens-to-generate", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="1: greedy")
    p.add_argument("--top-p", type=float, default=0.0, help="0: off")
    p.add_argument("--seed", type=int, default=-1, help="-1: a fresh seed per request")
    p.add_argument("--add-bos", action="store_true")
    p.add_argument("--early-exit", action="store_true", help="decode with early exit")
    p.add_argument(
        "--thres", type=float, default=None, help="early-exit confidence threshold in [0, 1] (server default 0.8)"
    )
    p.add_argument("--exit-layers", type=int, nargs="+", default=None, help="exits allowed to fire (default: all)")
    p.add_argument(
        "--exit-layer", type=int, default=None, help="generate with this one exit's head (instead of --early-exit)"
    )
    p.add_argument("--confidence", default="max_prob", help="max_prob, margin, entropy or saturation")
    p.add_argument("--kv-strategy", default="recompute", help="recompute or propagate")
    p.add_argument(
        "--speculative",
        default=None,
        metavar="EXIT:K[:T]",
        type=speculative_options,
        help="self-speculative decoding: draft up to K tokens with the exit at layer EXIT (greedy), "
        "stopping after a draft whose probability there is below T",
    )
    p.add_argument("--show-exits", action="store_true", help="print each token's exit layer and probability")
    p.add_argument("--timeout", type=float, default=600.0)
    return p.parse_args(argv)


def speculative_options(value: str) -> dict:
    """EXIT[:K[:T]] -> the request's `speculative` object."""
    parts = value.split(":")
    try:
        if not 1 <= len(parts) <= 3:
            raise ValueError
        options = {"exit_layer": int(parts[0])}
        if len(parts) > 1:
            options["num_draft"] = int(parts[1])
        if len(parts) > 2:
            options["draft_threshold"] = float(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected EXIT:K[:T] (e.g. 4:3 or 4:6:0.5), got {value!r}") from None
    return options


def build_request(args, prompt: str) -> dict:
    body = {
        "prompts": [prompt],
        "tokens_to_generate": args.tokens_to_generate,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "random_seed": args.seed,
        "add_BOS": args.add_bos,
        "echo_prompts": False,
        "use_early_exit": args.early_exit,
        "confidence": args.confidence,
        "kv_strategy": args.kv_strategy,
        "print_max_prob": args.show_exits,
    }
    if args.thres is not None:
        body["early_exit_thres"] = args.thres
    if args.exit_layers:
        body["exit_layers"] = args.exit_layers
    if args.exit_layer is not None:
        body["exit_layer"] = args.exit_layer
    if args.speculative:
        body["speculative"] = args.speculative
    return body


def put(url: str, body: dict, timeout: float):
    """(status, decoded JSON reply)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="PUT", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def main(argv=None) -> int:
    args = parse_args(argv)
    url = f"http://{args.server}/api"
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("Enter prompt: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        prompt = line.rstrip("\n")
        if not prompt:
            continue
        try:
            status, reply = put(url, build_request(args, prompt), args.timeout)
        except (urllib.error.URLError, OSError) as err:
            print(f"error: cannot reach {url}: {err}", file=sys.stderr, flush=True)
            return 1
        if status != 200:
            print(f"error {status}: {reply.get('message', reply)}", flush=True)
            continue
        print(reply["text"][0], flush=True)
        if args.show_exits:
            exits = reply["exit_layers"][0]
            pairs = " ".join(
                f"{seg!r}@{layer}({p:.2f})" for seg, layer, p in zip(reply["segments"][0], exits, reply["probs"][0])
            )
            print(f"  exits: {pairs}", flush=True)
            print(f"  mean exit layer {sum(exits) / max(len(exits), 1):.2f} over {len(exits)} tokens", flush=True)


if __name__ == "__main__":
    sys.exit(main())
