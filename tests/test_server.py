"""The text generation server, run as a real process on a loopback port (one process, and
torchrun with TP=2), against direct engine calls on the same checkpoint.

The checkpoint is a tiny random model (4 layers, exits after layers 1 and 2, NullTokenizer:
prompts are token ids as text); its exit confidences spread over a range where a threshold
mixes early and full-depth tokens, which the early-exit tests check before comparing.
"""

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.server_fixtures import (
    CLI,
    EOD,
    EXITS,
    MAX_BATCH,
    MAX_PROMPT,
    MAX_SEQ,
    MIXED_THRESHOLD,
    NUM_LAYERS,
    PROMPTS,
    VOCAB,
    Server,
    ids,
    put_api,
)

httpx = pytest.importorskip("httpx")


# -- fixtures: the session's checkpoint, the engine on it, its server -------------------------------


@pytest.fixture(scope="module")
def checkpoint(server_checkpoint):
    return server_checkpoint


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def engine(server, server_engine):
    """The model and tokenizer in this process (loaded while the server starts)."""
    return server_engine


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def direct(engine, prompts, strategy=None, max_new_tokens=8, sampling=None):
    from megatron.early_exit.inference import FullDepth, SamplingParams, generate

    model, _ = engine
    return generate(
        model,
        [ids(p) if isinstance(p, str) else p for p in prompts],
        strategy or FullDepth(),
        max_new_tokens,
        sampling or SamplingParams(),
        stop_tokens=(EOD,),
    )


def continuation(tokenizer, prompt, tokens):
    """OpenAI text of `tokens` after `prompt`: the end-of-document token is not shown."""
    tokens = tokens[:-1] if tokens and tokens[-1] == EOD else tokens
    head = tokenizer.detokenize(ids(prompt))
    return tokenizer.detokenize(ids(prompt) + tokens)[len(head) :]


def generated(reply, prompts):
    return [toks[len(ids(p)) :] for toks, p in zip(reply["tokens"], prompts)]


# -- PUT /api --------------------------------------------------------------------------------------


def test_api_greedy_and_seeded_sampling_equal_the_engine(client, engine):
    from megatron.early_exit.inference import SamplingParams

    _, tokenizer = engine
    reply = put_api(client, prompts=PROMPTS, tokens_to_generate=10, top_k=1, logprobs=True)
    ref = direct(engine, PROMPTS, max_new_tokens=10)
    assert generated(reply, PROMPTS) == ref.tokens
    assert len(set(ref.tokens[0])) > 3, "degenerate model: greedy output repeats one token"
    assert reply["text"] == [tokenizer.detokenize(ids(p) + t) for p, t in zip(PROMPTS, ref.tokens)]
    # Segments keep the spaces that start words: they join to the text.
    assert ["".join(seg) for seg in reply["segments"]] == reply["text"]
    assert [s.strip() for s in reply["segments"][0]] == [
        tokenizer.detokenize([t]) for t in ids(PROMPTS[0]) + ref.tokens[0]
    ]
    assert reply["exit_layers"] == [[NUM_LAYERS] * len(t) for t in ref.tokens]
    # Megatron-LM's alignment: one value per token after the first, the prompt's then the generation's.
    assert [len(lp) for lp in reply["logprobs"]] == [len(t) - 1 for t in reply["tokens"]]
    diff = max(
        abs(a - b) for p, r, o in zip(PROMPTS, ref.logprobs, reply["logprobs"]) for a, b in zip(r, o[len(ids(p)) - 1 :])
    )
    assert diff < 1e-4

    body = dict(prompts=PROMPTS, tokens_to_generate=10, temperature=0.9, top_k=20, top_p=0.9, random_seed=7)
    sampled = put_api(client, **body)
    ref = direct(engine, PROMPTS, max_new_tokens=10, sampling=SamplingParams(0.9, 20, 0.9, seed=7))
    assert generated(sampled, PROMPTS) == ref.tokens
    assert generated(sampled, PROMPTS) != generated(reply, PROMPTS)
    assert put_api(client, **body)["tokens"] == sampled["tokens"]  # the same seed again
    plain = put_api(client, prompts=PROMPTS[:1], tokens_to_generate=10, random_seed=3, echo_prompts=False)
    ref = direct(engine, PROMPTS[:1], max_new_tokens=10, sampling=SamplingParams(1.0, seed=3))  # Megatron's defaults
    assert plain["tokens"] == ref.tokens and plain["text"] == [continuation(tokenizer, PROMPTS[0], ref.tokens[0])]


def test_api_early_exit_fields_move_the_exit_layers(client, engine):
    from megatron.early_exit.inference import EarlyExit, SamplingParams, SelfSpeculative

    n = 10
    greedy = dict(prompts=PROMPTS, tokens_to_generate=n, top_k=1)
    first_exit = put_api(client, **greedy, use_early_exit=True, early_exit_thres=0.0)
    assert all(row == [NUM_LAYERS] + [EXITS[0]] * (len(row) - 1) for row in first_exit["exit_layers"])  # prefill: full
    only_second = put_api(client, **greedy, use_early_exit=True, early_exit_thres=0.0, exit_layers=[2])
    assert all(row == [NUM_LAYERS] + [2] * (len(row) - 1) for row in only_second["exit_layers"])
    off = put_api(client, **greedy, use_early_exit=False, early_exit_thres=0.0)
    assert off["exit_layers"] == [[NUM_LAYERS] * len(t) for t in generated(off, PROMPTS)]
    assert generated(off, PROMPTS) == direct(engine, PROMPTS, max_new_tokens=n).tokens
    assert generated(first_exit, PROMPTS) == direct(engine, PROMPTS, EarlyExit(0.0), n).tokens

    for kv, measure in (("recompute", "max_prob"), ("propagate", "max_prob"), ("recompute", "margin")):
        threshold = MIXED_THRESHOLD if measure == "max_prob" else 0.02
        reply = put_api(
            client,
            **greedy,
            use_early_exit=True,
            early_exit_thres=threshold,
            kv_strategy=kv,
            confidence=measure,
            print_max_prob=True,
        )
        ref = direct(engine, PROMPTS, EarlyExit(threshold, measure, kv), n)
        assert generated(reply, PROMPTS) == ref.tokens and reply["exit_layers"] == ref.exit_layers, (kv, measure)
        depths = [d for row in ref.exit_layers for d in row[1:]]
        assert min(depths) < NUM_LAYERS and max(depths) == NUM_LAYERS, f"threshold {threshold} does not mix exits"
        assert all(
            abs(p - torch.tensor(lp).exp().item()) < 1e-5
            for pr, lr in zip(reply["probs"], ref.logprobs)
            for p, lp in zip(pr, lr)
        )

    spec = put_api(client, **greedy, speculative={"exit_layer": 1, "num_draft": 3})
    assert generated(spec, PROMPTS) == generated(off, PROMPTS)
    assert spec["tokens"] == [
        ids(p) + t for p, t in zip(PROMPTS, direct(engine, PROMPTS, SelfSpeculative(1, 3), n).tokens)
    ]
    adaptive = put_api(client, **greedy, speculative={"exit_layer": 1, "num_draft": 5, "draft_threshold": 0.3})
    assert generated(adaptive, PROMPTS) == generated(off, PROMPTS)
    # Sampled: the request's seed gives the tokens `generate` samples with it, on every call.
    sampled = dict(prompts=PROMPTS, tokens_to_generate=n, temperature=1.0, top_k=20, random_seed=7)
    first = put_api(client, **sampled, speculative={"exit_layer": 1, "num_draft": 3})
    assert put_api(client, **sampled, speculative={"exit_layer": 1, "num_draft": 3})["tokens"] == first["tokens"]
    ref = direct(engine, PROMPTS, SelfSpeculative(1, 3), n, SamplingParams(1.0, 20, seed=7))
    assert generated(first, PROMPTS) == ref.tokens


def test_api_stop_sequences_end_at_the_token_that_completes_them(client, engine):
    _, tokenizer = engine
    full = generated(put_api(client, prompts=PROMPTS[:1], tokens_to_generate=10, top_k=1), PROMPTS[:1])[0]
    for stop in (str(full[3]), f"{full[4]} {full[5]}"):
        reply = put_api(client, prompts=PROMPTS[:1], tokens_to_generate=10, top_k=1, stop_sequences=[stop])
        n = next(n for n in range(1, 11) if stop in continuation(tokenizer, PROMPTS[0], full[:n]))
        assert n < 10 and generated(reply, PROMPTS[:1])[0] == full[:n]


# -- POST /v1/completions --------------------------------------------------------------------------


def test_completions_equal_the_engine_and_stream_the_same_text(client, engine):
    from megatron.early_exit.inference import EarlyExit, SamplingParams

    _, tokenizer = engine
    body = dict(
        model="tiny",
        prompt=PROMPTS,
        max_tokens=9,
        temperature=0,
        use_early_exit=True,
        early_exit_thres=MIXED_THRESHOLD,
        logprobs=1,
    )
    reply = client.post("/v1/completions", json=body).json()
    ref = direct(engine, PROMPTS, EarlyExit(MIXED_THRESHOLD), 9)
    assert [c["text"] for c in reply["choices"]] == [continuation(tokenizer, p, t) for p, t in zip(PROMPTS, ref.tokens)]
    assert [c["exit_layers"] for c in reply["choices"]] == [
        e[: len(c["logprobs"]["tokens"])] for e, c in zip(ref.exit_layers, reply["choices"])
    ]
    assert reply["usage"] == {
        "prompt_tokens": sum(len(ids(p)) for p in PROMPTS),
        "completion_tokens": ref.num_generated,
        "total_tokens": sum(len(ids(p)) for p in PROMPTS) + ref.num_generated,
    }
    assert {c["finish_reason"] for c in reply["choices"]} <= {"length", "stop"}
    first = reply["choices"][0]["logprobs"]
    assert "".join(first["tokens"]) == reply["choices"][0]["text"] and first["text_offset"][0] == 0
    assert abs(first["token_logprobs"][0] - ref.logprobs[0][0]) < 1e-4

    seeded = dict(prompt=PROMPTS[1], max_tokens=9, temperature=0.8, top_p=0.9, seed=11)
    sampled = client.post("/v1/completions", json=seeded).json()
    ref = direct(engine, PROMPTS[1:2], max_new_tokens=9, sampling=SamplingParams(0.8, 0, 0.9, seed=11))
    assert sampled["choices"][0]["text"] == continuation(tokenizer, PROMPTS[1], ref.tokens[0])

    for extra in ({"logprobs": 1, "echo": True}, {"stop": [" 7"]}, {}):
        plain = client.post("/v1/completions", json={**body, **extra}).json()
        events = []
        with client.stream(
            "POST", "/v1/completions", json={**body, **extra, "stream": True, "stream_options": {"include_usage": True}}
        ) as stream:
            assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["usage"] == plain["usage"] and chunks[-1]["choices"] == []
        for choice in plain["choices"]:
            mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == choice["index"]]
            assert "".join(c["text"] for c in mine) == choice["text"]
            assert mine[-1]["finish_reason"] == choice["finish_reason"]
            assert [d for c in mine for d in c["exit_layers"]] == choice["exit_layers"]
        if extra.get("echo"):
            assert plain["choices"][0]["text"].startswith(PROMPTS[0] + " ")


def test_openai_client(server, engine):
    openai = pytest.importorskip("openai")
    from megatron.early_exit.inference import EarlyExit

    _, tokenizer = engine
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    extra = {"use_early_exit": True, "early_exit_thres": 0.0, "exit_layers": [2]}
    reply = api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, extra_body=extra)
    ref = direct(engine, PROMPTS[:1], EarlyExit(0.0, exit_layers=(2,)), 8)
    assert reply.choices[0].text == continuation(tokenizer, PROMPTS[0], ref.tokens[0])
    assert reply.choices[0].model_extra["exit_layers"][1:] == [2] * (
        len(reply.choices[0].model_extra["exit_layers"]) - 1
    )
    assert reply.usage.completion_tokens == len(ref.tokens[0])
    stream = api.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, extra_body=extra, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == reply.choices[0].text
    with pytest.raises(openai.UnprocessableEntityError, match="early_exit_thres"):
        api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, extra_body={"early_exit_thres": 40})
    with pytest.raises(openai.BadRequestError, match="exit_layers"):
        api.completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=4, extra_body={"use_early_exit": True, "exit_layers": [3]}
        )


# -- bad requests, concurrency, the rest ------------------------------------------------------------

LONG = " ".join(["7"] * (MAX_PROMPT + 1))
BAD_REQUESTS = [  # (path, body: a dict, or raw bytes; the field the error must name)
    ("/api", b'{"prompts": ["5 17 3"], "tokens_to_generate": ', "body"),
    ("/api", {"prompts": 5}, "prompts"),
    ("/api", {"prompts": ["5 17 3"], "tokens_to_generate": "many"}, "tokens_to_generate"),
    ("/api", {"prompts": ["5 17 3"], "tokens_to_generate": -4}, "tokens_to_generate"),
    (
        "/api",
        {"prompts": ["5 17 3"], "tokens_to_generate": 4, "use_early_exit": True, "early_exit_thres": 40},
        "early_exit_thres",
    ),
    (
        "/api",
        {"prompts": ["5 17 3"], "tokens_to_generate": 4, "use_early_exit": True, "exit_layers": [3]},
        "exit_layers",
    ),
    ("/api", {"prompts": ["5 17 3"], "tokens_to_generate": 4, "use_early_exit": "yes"}, "use_early_exit"),
    (
        "/api",
        {"prompts": ["5 17 3"], "tokens_to_generate": 4, "use_early_exit": True, "confidence": "perplexity"},
        "confidence",
    ),
    (
        "/api",
        {"prompts": ["5 17 3"], "tokens_to_generate": 4, "top_k": 1, "speculative": {"exit_layer": 3}},
        "speculative.exit_layer",
    ),
    (
        "/api",
        {
            "prompts": ["5 17 3"],
            "tokens_to_generate": 4,
            "top_k": 1,
            "speculative": {"exit_layer": 1, "draft_threshold": 2},
        },
        "speculative.draft_threshold",
    ),
    ("/api", {"prompts": ["5 17 3"], "tokens_to_generate": 4, "temperature": -1}, "temperature"),
    ("/api", {"prompts": ["5 17 3"], "tokens_to_generate": 4, "tokens": 5}, "tokens"),
    ("/api", {"prompts": ["5 hello"], "tokens_to_generate": 4}, "prompts[0]"),
    ("/api", {"prompts": ["5 17 3"] * (MAX_BATCH + 1), "tokens_to_generate": 4}, "prompts"),
    ("/api", {"prompts": ["5"] * 129, "tokens_to_generate": 4}, "prompts"),
    ("/api", {"prompts": ["5 17 3", LONG], "tokens_to_generate": 4}, "prompts[1]"),
    ("/api", {"prompts": [" ".join(["7"] * 30)], "tokens_to_generate": 40}, "tokens_to_generate"),
    ("/v1/completions", {"prompt": "5 17 3", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": " ".join(["7"] * 20), "max_tokens": 50, "temperature": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": [], "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": [5, 500], "max_tokens": 4}, "prompt[0]"),
    ("/v1/completions", {"prompt": "5 17 3", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "5 17 3", "stop": ["1", "2", "3", "4", "5"]}, "stop"),
    ("/v1/completions", b"[1, 2]", "body"),
]


@pytest.mark.parametrize(
    "path,body,field", BAD_REQUESTS, ids=[f"{p}-{f}-{i}" for i, (p, _, f) in enumerate(BAD_REQUESTS)]
)
def test_bad_requests_get_4xx_naming_the_field_and_the_server_goes_on(client, path, body, field):
    if isinstance(body, bytes):
        reply = client.request(
            "PUT" if path == "/api" else "POST", path, content=body, headers={"Content-Type": "application/json"}
        )
    else:
        reply = client.request("PUT" if path == "/api" else "POST", path, json=body)
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)
    error = reply.json()["error"]
    assert error["message"].startswith(field) or f"{field}:" in error["message"], error
    assert put_api(client, prompts=["5 17 3"], tokens_to_generate=2, top_k=1)["tokens"][0][:3] == [5, 17, 3]


def test_engine_errors_are_400s():
    """An error the engine raises (after rank 0's checks passed) is a 400, and the next request is served."""
    from concurrent.futures import Future

    from fastapi.testclient import TestClient

    from megatron.early_exit.inference import InferenceConfigError
    from megatron.early_exit.server.app import Service, build_app
    from megatron.early_exit.server.jobs import ModelLimits
    from megatron.early_exit.tokenizers import NullTokenizer

    class RefusingWorker:
        queued, busy, served = 0, False, 0

        def submit(self, job):
            future = Future()
            future.set_exception(InferenceConfigError("kv must be one of ('recompute', 'propagate'), got 'copy'"))
            return future

    limits = ModelLimits("tiny", 128, NUM_LAYERS, tuple(EXITS), MAX_SEQ, MAX_BATCH, MAX_PROMPT)
    with TestClient(
        build_app(Service(RefusingWorker(), NullTokenizer(VOCAB), limits)), base_url="http://localhost"
    ) as local:
        reply = local.put("/api", json={"prompts": ["1 2"], "tokens_to_generate": 2})
        assert reply.status_code == 400 and "kv must be one of" in reply.json()["error"]["message"]
        assert local.get("/health").json()["status"] == "ok"


def test_worker_merges_compatible_neighbours_in_order_and_survives_errors(dist1, monkeypatch):
    """The queue without a model: greedy jobs with equal settings right behind each other share
    an engine call (up to the batch size), others run alone and in order; an engine error
    reaches every request of its call and the loop goes on; a request whose caller left is skipped."""
    import threading

    from megatron.early_exit.inference import (
        EarlyExit,
        FullDepth,
        GenerationResult,
        InferenceConfigError,
        SamplingParams,
    )
    from megatron.early_exit.server import worker as worker_module
    from megatron.early_exit.server.jobs import Job

    calls = []

    def fake_run_job(model, job, on_tokens=None, cancelled=None):
        calls.append([p[0] for p in job.prompts])
        if job.prompts[0][0] == 666:
            raise InferenceConfigError("refused")
        rows = len(job.prompts)
        return GenerationResult([[p[0]] for p in job.prompts], [[4]] * rows, [[0.0]] * rows, num_layers=4)

    monkeypatch.setattr(worker_module, "run_job", fake_run_job)
    sampled = SamplingParams(temperature=1.0, seed=1)

    def job(first, strategy=FullDepth(), sampling=SamplingParams(), rows=1):
        return Job(tuple((first + r,) for r in range(rows)), strategy, sampling, 4)

    worker = worker_module.Worker(model=None, max_batch_size=4)
    jobs = [
        job(1),
        job(2, rows=2),
        job(10),
        job(11),
        job(20, EarlyExit(0.5)),
        job(30, sampling=sampled),
        job(40, sampling=sampled),
        job(50),
        job(51),
        job(666, EarlyExit(0.9)),
        job(667, EarlyExit(0.9)),
        job(70),
    ]
    futures = [worker.submit(j) for j in jobs]
    assert futures[-1].cancel()  # its caller went away before it ran
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        tokens = [f.result(timeout=30).tokens for f in futures[:9]]
        for f in futures[9:11]:
            with pytest.raises(InferenceConfigError):
                f.result(timeout=30)
    finally:
        worker.stop()
        thread.join(timeout=30)
    assert calls == [[1, 2, 3, 10], [11], [20], [30], [40], [50, 51], [666, 667]]
    assert tokens == [[[1]], [[2], [3]], [[10]], [[11]], [[20]], [[30]], [[40]], [[50]], [[51]]]
    assert worker.served == 7 and worker.queued == 0


def test_launch_flags_tokenizer_override_and_ignored_model_flags(capsys):
    import argparse

    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.server.launch import build_tokenizer, parse_args

    args = parse_args(["--load", "ckpt", "--use-checkpoint-args", "--num-layers", "24", "--vocab-size", "50"])
    assert "ignored" in capsys.readouterr().err and args.use_checkpoint_args and args.port == 5000
    from megatron.early_exit.models.model_config import TokenizerConfig

    stored = argparse.Namespace(
        tokenizer=TokenizerConfig(type="NullTokenizer", vocab_size=VOCAB)
    )  # as a ModelConfig holds it
    assert build_tokenizer(args, stored, 128).vocab_size == 50  # the flag replaces the stored vocabulary
    with pytest.raises(ConfigError, match="exceed the model's vocabulary"):
        build_tokenizer(parse_args(["--load", "ckpt", "--vocab-size", "200"]), stored, 128)
    with pytest.raises(ConfigError, match="--max-batch-size"):
        parse_args(["--load", "ckpt", "--max-batch-size", "0"])


def test_fifty_concurrent_requests_complete_correctly_and_health_answers(client, engine):
    from megatron.early_exit.inference import EarlyExit, SamplingParams

    _, tokenizer = engine

    def request(i):
        prompt = f"{i % 90} {(7 * i) % 90} {(13 * i + 5) % 90}"
        kind = i % 4
        if kind == 0:
            reply = client.put("/api", json=dict(prompts=[prompt], tokens_to_generate=8, top_k=1))
            return kind, prompt, reply.status_code, reply.json()["tokens"][0][3:]
        if kind == 1:
            reply = client.put(
                "/api",
                json=dict(prompts=[prompt], tokens_to_generate=8, top_k=1, use_early_exit=True, early_exit_thres=0.0),
            )
            return kind, prompt, reply.status_code, reply.json()["tokens"][0][3:]
        if kind == 2:
            reply = client.post("/v1/completions", json=dict(prompt=prompt, max_tokens=8, temperature=0))
            return kind, prompt, reply.status_code, reply.json()["choices"][0]["text"]
        reply = client.put("/api", json=dict(prompts=[prompt], tokens_to_generate=8, random_seed=i))
        return kind, prompt, reply.status_code, reply.json()["tokens"][0][3:]

    with ThreadPoolExecutor(50) as pool:
        futures = [pool.submit(request, i) for i in range(50)]
        during = []  # /health answers while the decoder works: it never waits for the queue
        while not all(f.done() for f in futures):
            health = client.get("/health")
            assert health.status_code == 200
            during.append(health.json()["busy"] or health.json()["queued"] > 0)
            time.sleep(0.02)
        results = [f.result() for f in futures]
    assert all(status == 200 for _, _, status, _ in results)
    for i, (kind, prompt, _, got) in enumerate(results):
        strategy = EarlyExit(0.0) if kind == 1 else None
        sampling = SamplingParams(1.0, seed=i) if kind == 3 else None
        ref = direct(engine, [prompt], strategy, 8, sampling).tokens[0]
        assert got == (continuation(tokenizer, prompt, ref) if kind == 2 else ref), (i, kind)
    assert any(during), "no /health answer came while the decoder was busy or requests were queued"


def test_health_models_and_openapi(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["queued"] == 0
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == "tiny" and card["exit_layer_nums"] == EXITS and card["num_layers"] == NUM_LAYERS
    schema = client.get("/openapi.json").json()
    assert {"/api", "/v1/completions", "/v1/models", "/health"} <= set(schema["paths"])
    assert "early_exit_thres" in schema["components"]["schemas"]["ApiRequest"]["properties"]
    assert client.get("/api").status_code == 405


def test_cli_reads_prompts_until_eof(server, engine):
    from megatron.early_exit.inference import EarlyExit

    _, tokenizer = engine
    host_port = server.url[len("http://") :]
    out = subprocess.run(
        [
            sys.executable,
            CLI,
            host_port,
            "--top-k",
            "1",
            "--tokens-to-generate",
            "6",
            "--early-exit",
            "--thres",
            "0",
            "--show-exits",
        ],
        input="5 17 3\n5 hello\n\n40 2\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for prompt in ("5 17 3", "40 2"):
        ref = direct(engine, [prompt], EarlyExit(0.0), 6)
        assert tokenizer.detokenize(ids(prompt) + ref.tokens[0])[len(prompt) :] in out.stdout
    assert "error 400: prompts[0]" in out.stdout and out.stdout.count("mean exit layer") == 2


# -- tensor parallel -------------------------------------------------------------------------------


def test_confidence_estimator_lets_requests_use_the_learned_measure(server, checkpoint, tmp_path):
    """--confidence-estimator attaches CALM's classifier: a request with confidence "learned"
    decodes as generate with the same estimator; without the flag it is a 400 naming the field."""
    from megatron.early_exit.inference import EarlyExit, generate
    from megatron.early_exit.inference.learned_confidence import ConfidenceEstimator
    from megatron.early_exit.inference.loading import load_model

    body = dict(prompts=[PROMPTS[1]], tokens_to_generate=6, top_k=1, use_early_exit=True, early_exit_thres=0.5)
    body["confidence"] = "learned"
    with httpx.Client(base_url=server.url, timeout=120) as client:
        refused = client.put("/api", json=body)
    assert refused.status_code == 400 and "--confidence-estimator" in refused.text and "confidence" in refused.text
    path = str(tmp_path / "estimator.safetensors")
    hidden = load_model(checkpoint)[0].config.hidden_size
    estimator = ConfidenceEstimator(hidden, EXITS)
    for num, p in ((EXITS[0], 0.1), (EXITS[1], 0.9)):  # exit 1 never sure, exit 2 always
        torch.nn.init.zeros_(estimator.heads[str(num)].weight)
        torch.nn.init.constant_(estimator.heads[str(num)].bias, float(torch.logit(torch.tensor(p))))
    estimator.save(path, {})
    model = load_model(checkpoint, confidence_estimator=path)[0]
    ref = generate(model, [ids(PROMPTS[1])], EarlyExit(0.5, "learned"), 6)
    assert set(ref.exit_layers[0][1:]) == {EXITS[1]}  # the prompt's token at full depth, then exit 2
    srv = Server(checkpoint, str(tmp_path / "server.log"), extra=["--confidence-estimator", path])
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            reply = put_api(client, **body)
    finally:
        srv.stop()
    assert generated(reply, [PROMPTS[1]]) == ref.tokens and reply["exit_layers"] == ref.exit_layers


@pytest.mark.multiproc
def test_tp2_server_equals_the_single_process_engine(checkpoint, engine, tmp_path):
    from megatron.early_exit.inference import EarlyExit, SamplingParams, SelfSpeculative

    _, tokenizer = engine
    srv = Server(checkpoint, str(tmp_path / "server_tp2.log"), nproc=2)
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as tp2:
            greedy = dict(prompts=PROMPTS, tokens_to_generate=10, top_k=1)
            reply = put_api(
                tp2, **greedy, use_early_exit=True, early_exit_thres=MIXED_THRESHOLD, kv_strategy="propagate"
            )
            ref = direct(engine, PROMPTS, EarlyExit(MIXED_THRESHOLD, kv="propagate"), 10)
            assert generated(reply, PROMPTS) == ref.tokens and reply["exit_layers"] == ref.exit_layers
            assert min(d for row in ref.exit_layers for d in row) < NUM_LAYERS
            # Prompt scoring (a ScoreJob broadcast to both ranks), and a stream sent as it is decoded.
            from megatron.early_exit.inference.scoring import score

            scored = put_api(tp2, prompts=PROMPTS, tokens_to_generate=0, exit_layer=EXITS[1])
            ref_scores = score(engine[0], [ids(p) for p in PROMPTS], exit_layer=EXITS[1])
            assert max(abs(a - b) for r, o in zip(ref_scores.logprobs, scored["logprobs"]) for a, b in zip(r, o)) < 1e-4
            body = dict(prompt=PROMPTS[1], max_tokens=10, temperature=0, echo=True, logprobs=2)
            with tp2.stream("POST", "/v1/completions", json={**body, "stream": True}) as reply:
                chunks = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]
            streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            assert streamed == tp2.post("/v1/completions", json=body).json()["choices"][0]["text"]
            bad = tp2.put("/api", json={**greedy, "use_early_exit": True, "exit_layers": [3]})
            assert bad.status_code == 400 and "exit_layers" in bad.json()["error"]["message"]
            sampled = put_api(tp2, prompts=PROMPTS, tokens_to_generate=10, temperature=0.9, top_k=20, random_seed=5)
            ref = direct(engine, PROMPTS, max_new_tokens=10, sampling=SamplingParams(0.9, 20, seed=5))
            assert generated(sampled, PROMPTS) == ref.tokens
            with ThreadPoolExecutor(8) as pool:
                replies = list(
                    pool.map(
                        lambda p: tp2.post("/v1/completions", json=dict(prompt=p, max_tokens=8, temperature=0)).json(),
                        [f"{i} {i + 3}" for i in range(8)],
                    )
                )
            for i, r in enumerate(replies):
                prompt = f"{i} {i + 3}"
                assert r["choices"][0]["text"] == continuation(tokenizer, prompt, direct(engine, [prompt]).tokens[0])
            # A self-speculative request beside batched ones: both ranks step the engine between
            # its rounds (("step", plan) or ("round", None)); every reply as decoded alone.
            spec = dict(prompts=[PROMPTS[0]], tokens_to_generate=24, top_k=1, speculative={"exit_layer": 1})
            with ThreadPoolExecutor(4) as pool:
                long = pool.submit(put_api, tp2, **spec)
                plain = list(pool.map(lambda p: put_api(tp2, prompts=[p], tokens_to_generate=6, top_k=1), PROMPTS))
            assert generated(long.result(), [PROMPTS[0]]) == direct(engine, [PROMPTS[0]], SelfSpeculative(1), 24).tokens
            assert [generated(r, [p])[0] for r, p in zip(plain, PROMPTS)] == direct(engine, PROMPTS, None, 6).tokens
    finally:
        srv.stop()
    assert srv.proc.returncode is not None


@pytest.mark.slow  # make test: the TP=2 server above, and pipeline decoding in multiproc/cases_inference_pipeline
@pytest.mark.multiproc
def test_pp2_server_broadcasts_to_both_stages(checkpoint, engine, tmp_path):
    """Two pipeline stages behind one server (pipeline-based early exit)."""
    srv = Server(checkpoint, str(tmp_path / "server_pp2.log"), nproc=2, layout_flag="--pipeline-model-parallel-size")
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as pp2:
            greedy = dict(prompts=PROMPTS, tokens_to_generate=10, top_k=1)
            assert generated(put_api(pp2, **greedy), PROMPTS) == direct(engine, PROMPTS, max_new_tokens=10).tokens
            refused = pp2.put("/api", json={**greedy, "speculative": {"exit_layer": 1}})
            assert 400 <= refused.status_code < 500, refused.text
            first = put_api(pp2, **greedy, use_early_exit=True, early_exit_thres=0.0, kv_strategy="pipeline")
            assert all(row == [NUM_LAYERS] + [EXITS[0]] * (len(row) - 1) for row in first["exit_layers"])
            from megatron.early_exit.inference.scoring import score

            for exit_layer in (None, EXITS[1]):  # the final layer's stage, and the exit's
                scored = put_api(pp2, prompts=PROMPTS, tokens_to_generate=0, exit_layer=exit_layer)
                ref = score(engine[0], [ids(p) for p in PROMPTS], exit_layer=exit_layer)
                assert max(abs(a - b) for r, o in zip(ref.logprobs, scored["logprobs"]) for a, b in zip(r, o)) < 1e-4
        # Continuous batching (the default) is not over stages yet: said once, at start.
        assert srv.tail().count("serves with static batching") == 1
    finally:
        srv.stop()
