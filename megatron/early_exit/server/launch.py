"""Start the server: parallel state, the checkpoint, then HTTP on rank 0 and the decode loop
on every rank (tools/run_text_generation_server.py calls `main`).

    torchrun --nproc-per-node 2 tools/run_text_generation_server.py --load CKPT \\
        --tensor-model-parallel-size 2 --port 5000

The checkpoint's stored flags rebuild the model (as with --use-checkpoint-args); model-shape
flags that Megatron-LM launch scripts pass by habit are ignored with a warning. Tokenizer
flags given here replace the stored tokenizer.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from typing import List, Optional

TOKENIZER_FLAGS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size")


def build_parser() -> argparse.ArgumentParser:
    from megatron.early_exit.server.guard import DEFAULT_BODY_READ_TIMEOUT
    from megatron.early_exit.tokenizers import TOKENIZER_TYPES

    p = argparse.ArgumentParser(
        description="Text generation server for early-exit models (Megatron-LM's PUT /api, "
        "OpenAI's /v1/completions and /v1/chat/completions)"
    )
    g = p.add_argument_group("model")
    g.add_argument("--load", required=True, help="checkpoint directory (--save of pretrain_early_exit_gpt.py)")
    g.add_argument(
        "--load-iteration",
        "--ckpt-step",
        dest="load_iteration",
        type=int,
        default=None,
        help="serve this iteration of --load (default, or 0: the latest)",
    )
    g.add_argument(
        "--use-checkpoint-args",
        action="store_true",
        help="accepted for Megatron-LM's scripts: the checkpoint's stored flags always rebuild the model",
    )
    g.add_argument("--model-name", default=None, help="name in /v1/models and replies (default: the --load folder)")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None, help="replace the stored tokenizer")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    g.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template of /v1/chat/completions (default: a Hugging Face tokenizer's own)",
    )
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g.add_argument("--seed", type=int, default=1234, help="seed of the model-parallel RNG state")
    g.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    g = p.add_argument_group("serving")
    g.add_argument(
        "--exit-thresholds-file",
        default=None,
        metavar="FILE",
        help="per-exit thresholds (tools/calibrate_threshold.py --output-json) for early-exit requests that set none",
    )
    g.add_argument(
        "--confidence-estimator",
        default=None,
        metavar="FILE",
        help="CALM's classifier (tools/train_confidence_estimator.py): requests may use confidence 'learned' "
        "(and 'gated_max_prob' with an estimator trained --hidden-state-only)",
    )
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=5000, help="0: any free port (printed at start)")
    g.add_argument(
        "--batching",
        choices=("continuous", "static"),
        default="continuous",
        help="continuous: sequences join and leave the running batch at every decode step, each leaving at "
        "its own exit (docs/serving.md); static: compatible queued requests are merged and run to "
        "their end (with --pipeline-model-parallel-size > 1, always static)",
    )
    g.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="continuous: KV-cache slots, i.e. sequences decoded at once; static: prompts per engine call "
        "(compatible greedy requests share one call); both: prompts per request",
    )
    g.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="continuous: prompt tokens fed per decode step, in all (a long prompt is fed over several "
        "steps, so it never stalls the sequences running)",
    )
    g.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's sequence length - 1")
    g.add_argument(
        "--max-context-length",
        type=int,
        default=None,
        help="prompt + generated tokens (default and maximum: the model's sequence length)",
    )
    g.add_argument("--max-queued-requests", type=int, default=1024, help="more waiting requests get a 503")
    g.add_argument(
        "--heartbeat-seconds",
        type=float,
        default=30.0,
        help="an idle rank 0 pings the other ranks this often, below the process group's timeout",
    )
    g.add_argument("--log-level", default="info", help="uvicorn's log level (info logs every request)")
    g = p.add_argument_group("HTTP requests (docs/security.md)")
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        help="larger bodies get a 413 before they are read (default: 1 MiB, or 32 bytes per prompt token "
        "of --max-batch-size prompts at their longest when that is more)",
    )
    g.add_argument(
        "--body-read-timeout",
        type=float,
        default=DEFAULT_BODY_READ_TIMEOUT,
        metavar="SECONDS",
        help="a PUT/POST body must arrive within this many seconds of the request's headers (408 and the "
        "connection closed otherwise; nginx's client_body_timeout is 60 s)",
    )
    g.add_argument(
        "--allowed-hosts",
        nargs="*",
        default=[],
        metavar="HOST",
        help="Host header names accepted besides --host, localhost, 127.0.0.1 and [::1] (against DNS "
        "rebinding); '*' accepts any",
    )
    g.add_argument(
        "--cors-origins",
        nargs="*",
        default=[],
        metavar="ORIGIN",
        help="origins whose web pages may call the server (CORS headers; default none); '*' any",
    )
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args, ignored = build_parser().parse_known_args(argv)
    if ignored:
        print(
            f"warning: ignored (the checkpoint's stored flags rebuild the model): {' '.join(ignored)}",
            file=sys.stderr,
            flush=True,
        )
    from megatron.early_exit.errors import ConfigError

    if args.chat_template is not None and not os.path.isfile(args.chat_template):
        raise ConfigError(f"--chat-template {args.chat_template}: no such file")
    for flag in (
        "max_batch_size",
        "prefill_chunk",
        "max_prompt_tokens",
        "max_context_length",
        "max_queued_requests",
        "max_request_bytes",
    ):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not (math.isfinite(args.body_read_timeout) and args.body_read_timeout > 0):
        raise ConfigError(f"--body-read-timeout must be a finite number of seconds > 0, got {args.body_read_timeout}")
    return args


def build_tokenizer(args, stored, model_vocab_size: int):
    """The stored tokenizer, with any tokenizer flag given here replacing the stored one."""
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.tokenizers import build_tokenizer as build

    # The stored model description's TokenizerConfig names them type, model, vocab_file, ...
    stored_names = dict(
        tokenizer_type="type",
        tokenizer_model="model",
        vocab_file="vocab_file",
        merge_file="merge_file",
        vocab_size="vocab_size",
    )
    flags = {
        name: getattr(args, name) if getattr(args, name) is not None else getattr(stored.tokenizer, stored_names[name])
        for name in TOKENIZER_FLAGS
    }
    tokenizer = build(
        flags["tokenizer_type"], flags["tokenizer_model"], flags["vocab_file"], flags["merge_file"], flags["vocab_size"]
    )
    if tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(
            f"--tokenizer-type {flags['tokenizer_type']}: its {tokenizer.vocab_size} tokens exceed "
            f"the model's vocabulary of {model_vocab_size}"
        )
    return tokenizer


def build_limits(args, model, stored):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.server.jobs import ModelLimits

    max_seq = model.max_sequence_length
    context = args.max_context_length or max_seq
    if context > max_seq:
        raise ConfigError(f"--max-context-length {context} exceeds the model's maximum sequence length {max_seq}")
    served = served_measures(model)
    return ModelLimits(
        name=args.model_name or os.path.basename(os.path.normpath(args.load)),
        vocab_size=model.vocab_size,
        num_layers=stored.num_layers,
        exit_layer_nums=tuple(int(n) for n in (stored.exit_layer_nums or [])),
        max_sequence_length=context,
        max_batch_size=args.max_batch_size,
        max_prompt_tokens=min(args.max_prompt_tokens or context - 1, context - 1),
        pipeline_stages=args.pipeline_model_parallel_size,
        confidence_measures=served,
        **_exit_thresholds(args.exit_thresholds_file, stored, served),
    )


def served_measures(model) -> tuple:
    """The confidence measures this model decodes with: those that need a classifier only when
    one is attached (--confidence-estimator) and fits them."""
    from megatron.early_exit.inference import InferenceConfigError
    from megatron.early_exit.inference.confidence import CONFIDENCE_MEASURES, get_confidence_measure

    def serves(name):
        try:
            return get_confidence_measure(name, model) is not None
        except InferenceConfigError:
            return False

    return tuple(sorted(name for name in CONFIDENCE_MEASURES if serves(name)))


def _exit_thresholds(path, stored, served=None):
    """The thresholds of --exit-thresholds-file and their measure, which must be among `served`
    (the measures the model decodes with; default: those that need no estimator)."""
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.inference.confidence import CONFIDENCE_MEASURES, PLAIN_MEASURES
    from megatron.early_exit.inference.learn_then_test import read_calibration

    if path is None:
        return {}
    thresholds, measure = read_calibration(path)
    served = list(PLAIN_MEASURES if served is None else served)
    if measure is not None and measure not in served:
        needs = (
            " (start the server with --confidence-estimator FILE)"
            if measure in CONFIDENCE_MEASURES and CONFIDENCE_MEASURES[measure].needs_estimator
            else ""
        )
        raise ConfigError(
            f"--exit-thresholds-file {path}: calibrated for measure {measure!r}{needs}; "
            f"the server decodes with {served}"
        )
    bad = sorted(set(thresholds) - set(int(n) for n in (stored.exit_layer_nums or [])))
    if bad:
        raise ConfigError(
            f"--exit-thresholds-file {path}: exits {bad} are not exits of the model "
            f"({list(stored.exit_layer_nums or [])})"
        )
    return {"exit_thresholds": thresholds, "exit_thresholds_measure": measure}


def build_policy(args, limits):
    from megatron.early_exit.server.guard import HttpPolicy, allowed_hosts, default_max_request_bytes

    size = args.max_request_bytes or default_max_request_bytes(limits.max_batch_size, limits.max_prompt_tokens)
    return HttpPolicy(
        max_request_bytes=size,
        body_read_timeout=args.body_read_timeout,
        allowed_hosts=allowed_hosts(args.host, args.allowed_hosts),
        cors_origins=tuple(args.cors_origins),
    )


def warm_up(model) -> None:
    """One token through the engine on every rank: refuses, at start and on every rank alike,
    a model or layout the engine cannot decode (e.g. one it has no pipeline method for)."""
    from megatron.early_exit.inference import FullDepth, SamplingParams
    from megatron.early_exit.server.jobs import Job, run_job

    run_job(model, Job(((0,),), FullDepth(), SamplingParams(), 1))


def build_engine(args, model, limits):
    """The continuous-batching engine (the same on every rank), or None for static batching."""
    if args.batching != "continuous":
        return None
    if args.pipeline_model_parallel_size > 1:
        if model.pre_process:  # one line, from the first stage
            print(
                f"--batching continuous: not over pipeline stages yet; --pipeline-model-parallel-size "
                f"{args.pipeline_model_parallel_size} serves with static batching",
                flush=True,
            )
        return None
    from megatron.early_exit.inference.engine import Engine

    return Engine(model, args.max_batch_size, limits.max_sequence_length, args.prefill_chunk, args.max_queued_requests)


def serve(args, model, tokenizer, limits, engine=None) -> None:
    """Rank 0: HTTP in a thread, the decode loop in the main thread until SIGINT or SIGTERM."""
    import uvicorn

    from megatron.early_exit.errors import EarlyExitError
    from megatron.early_exit.server.app import Service, build_app
    from megatron.early_exit.server.continuous import ContinuousWorker
    from megatron.early_exit.server.tokenizer_api import find_chat_template
    from megatron.early_exit.server.worker import Worker, broadcast

    if engine is not None:
        worker = ContinuousWorker(engine, model, args.heartbeat_seconds, args.max_queued_requests)
    else:
        worker = Worker(model, args.max_batch_size, args.max_queued_requests, args.heartbeat_seconds)
    policy = build_policy(args, limits)
    app = build_app(Service(worker, tokenizer, limits, find_chat_template(tokenizer, args.chat_template)), policy)
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            broadcast(("stop", None))
            raise EarlyExitError(f"could not serve on {args.host}:{args.port} (--host, --port); see the log above")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(
        f"serving {limits.name} on http://{args.host}:{port} (PUT /api, POST /v1/completions, "
        f"/v1/chat/completions, /tokenize, /detokenize, GET /tokenizer_info, /v1/models, /health, /metrics, /docs)",
        flush=True,
    )
    hosts = "any" if policy.allowed_hosts is None else ", ".join(policy.allowed_hosts)
    print(
        f"requests: JSON bodies up to {policy.max_request_bytes} bytes (--max-request-bytes) within "
        f"{policy.body_read_timeout:g} s (--body-read-timeout); Host: {hosts} "
        f"(--allowed-hosts); CORS origins: {', '.join(policy.cors_origins) or 'none'} (--cors-origins)",
        flush=True,
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stop())
    worker.run()
    server.should_exit = True
    thread.join(timeout=5)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    import torch

    from megatron.early_exit.errors import install_excepthook

    install_excepthook()
    from megatron.early_exit.inference import InferenceConfigError
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.launcher import watch_launcher
    from megatron.early_exit.parallel import ParallelConfigError, destroy_parallel, initialize_parallel
    from megatron.early_exit.server.worker import follow

    watch_launcher()  # a rank whose torchrun was killed exits (and frees its port)
    if args.threads:
        torch.set_num_threads(args.threads)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ctx = initialize_parallel(tp, pp, seed=args.seed, device=args.device)
    if ctx.dp_size != 1:
        raise ParallelConfigError(
            f"the server runs one model replica: launch --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}) processes, not {ctx.world_size}"
        )
    try:
        layout = {"pipeline_model_parallel_size": pp} if pp > 1 else {}  # this rank's stage under PP
        model, tokenizer, stored = load_model(
            args.load,
            tp,
            ctx.device,
            iteration=args.load_iteration or None,
            confidence_estimator=args.confidence_estimator,
            **layout,
        )
        warm_up(model)
    except Exception as err:
        if pp == 1:
            raise
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InferenceConfigError(
            f"--pipeline-model-parallel-size {pp}: the inference engine could not load or "
            f"decode this pipeline layout ({first})"
        ) from err
    if any(getattr(args, name) is not None for name in TOKENIZER_FLAGS):
        tokenizer = build_tokenizer(args, stored, model.vocab_size)
        model.tokenizer_vocab_size = tokenizer.vocab_size  # ids beyond it are never decoded
    limits = build_limits(args, model, stored)
    engine = build_engine(args, model, limits)
    if ctx.rank == 0:
        serve(args, model, tokenizer, limits, engine)
    else:
        follow(model, engine)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    destroy_parallel()
