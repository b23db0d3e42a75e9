"""True streaming: a streamed reply sends each token when the engine decodes it.

The ordering test runs the HTTP app (uvicorn on a loopback port) and the worker in this
process, on a real model: the engine's token callback is held after the first token until
the client has received that token over HTTP. If the reply were sent only after decoding,
the client could never receive it while decoding waits (the wait would time out, which the
test records and fails on). No timing is measured.
"""

import json
import threading

import pytest

from tests.helpers import wait_until
from tests.server_fixtures import EOD, EXITS, NUM_LAYERS, InProcessServer, write_checkpoint

httpx = pytest.importorskip("httpx")

SEQ, TOKENS = 128, 64
PROMPT = "5 17 3"


@pytest.fixture(scope="module")
def engine(dist1, tmp_path_factory):
    from megatron.early_exit.inference.loading import load_model

    root = str(tmp_path_factory.mktemp("stream_ckpt"))
    write_checkpoint(root, seq_length=SEQ)
    model, tokenizer, _ = load_model(root)
    return model, tokenizer


class LocalServer(InProcessServer):
    """The app and its worker in threads of this process."""

    def __init__(self, model, tokenizer):
        from megatron.early_exit.server.app import Service
        from megatron.early_exit.server.jobs import ModelLimits
        from megatron.early_exit.server.worker import Worker

        limits = ModelLimits("tiny", model.vocab_size, NUM_LAYERS, tuple(EXITS), SEQ, 8, SEQ - 1)
        worker = Worker(model, max_batch_size=8)
        super().__init__(Service(worker, tokenizer, limits), worker)


@pytest.fixture(scope="module")
def local(engine):
    srv = LocalServer(*engine)
    yield srv
    srv.close()


def sse(client, path, body):
    """The chunks of a streamed reply (server-sent events up to [DONE])."""
    events = []
    with client.stream("POST", path, json=body) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_first_token_reaches_the_client_before_the_last_is_decoded(local, monkeypatch):
    from megatron.early_exit.server import worker as worker_module

    real_run_job = worker_module.run_job
    delivered = threading.Event()
    decoded = []  # tokens decoded so far, appended by the engine's callback
    waits = []  # whether the client's signal came while decoding was held

    def held_run_job(model, job, on_tokens=None, **kwargs):
        def listen(event):
            decoded.extend(event.tokens)
            on_tokens(event)
            if len(waits) == 0:
                waits.append(delivered.wait(timeout=120))

        return real_run_job(model, job, on_tokens=listen if on_tokens else None, **kwargs)

    monkeypatch.setattr(worker_module, "run_job", held_run_job)
    body = dict(prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True)
    texts, decoded_at_first = [], None
    with httpx.Client(base_url=local.url, timeout=300) as client:
        with client.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[len("data: ") :])["choices"][0]
                if choice["exit_layers"] and decoded_at_first is None:
                    decoded_at_first = len(decoded)
                    delivered.set()
                texts.append(choice["text"])
        monkeypatch.setattr(worker_module, "run_job", real_run_job)
        plain = client.post("/v1/completions", json={**body, "stream": False}).json()
    assert waits == [True], "the first token did not reach the client while decoding was held"
    assert decoded_at_first == 1
    assert len(decoded) == TOKENS or decoded[-1] == EOD
    assert len(decoded) > 1, "nothing was decoded after the first token"
    assert "".join(texts) == plain["choices"][0]["text"]


def test_streams_equal_replies_for_every_strategy(local):
    """Streamed text, exit layers and logprobs equal the non-streamed reply's."""

    strategies = [
        {},
        {"use_early_exit": True, "early_exit_thres": 0.16},
        {"use_early_exit": True, "early_exit_thres": 0.16, "kv_strategy": "propagate"},
        {"speculative": {"exit_layer": 1, "num_draft": 3}},
        {"exit_layer": 1},
    ]
    with httpx.Client(base_url=local.url, timeout=300) as client:
        for extra in strategies:
            body = dict(prompt=[PROMPT, "40 2 77 13"], max_tokens=16, temperature=0, logprobs=2, **extra)
            plain = client.post("/v1/completions", json=body).json()
            chunks = sse(client, "/v1/completions", {**body, "stream": True})
            for choice in plain["choices"]:
                mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
                assert "".join(c["text"] for c in mine) == choice["text"], extra
                assert [d for c in mine for d in c["exit_layers"]] == choice["exit_layers"], extra
                streamed_lp = [v for c in mine if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
                assert streamed_lp == choice["logprobs"]["token_logprobs"], extra


def test_concurrent_streams_are_batched_and_each_gets_its_rows(local, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from megatron.early_exit.server import worker as worker_module

    with httpx.Client(base_url=local.url, timeout=300) as client:
        # The first engine call waits until every request is in it or queued: the queued ones then share one call.
        real_run_job, held = worker_module.run_job, []

        def held_run_job(model, job, on_tokens=None, **kwargs):
            def listen(event):
                on_tokens(event)
                wait_until(lambda: held or local.worker.queued + len(job.prompts) >= 8, timeout=120, interval=0.01)
                held.append(True)

            return real_run_job(model, job, on_tokens=listen if on_tokens else None, **kwargs)

        monkeypatch.setattr(worker_module, "run_job", held_run_job)
        served = local.worker.served
        prompts = [f"{i} {i + 5} {2 * i}" for i in range(8)]
        body = dict(max_tokens=16, temperature=0)
        with ThreadPoolExecutor(8) as pool:
            streamed = list(
                pool.map(lambda p: sse(client, "/v1/completions", {**body, "prompt": p, "stream": True}), prompts)
            )
        monkeypatch.setattr(worker_module, "run_job", real_run_job)
        assert local.worker.served - served == 2, "the seven queued streams did not share one engine call"
        for p, chunks in zip(prompts, streamed):
            plain = client.post("/v1/completions", json={**body, "prompt": p}).json()
            assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]


def test_stop_sequences_are_never_sent_in_a_stream(local):
    with httpx.Client(base_url=local.url, timeout=300) as client:
        full = client.post("/v1/completions", json=dict(prompt=PROMPT, max_tokens=12, temperature=0)).json()
        words = full["choices"][0]["text"].split()
        stop = f" {words[3]} {words[4]}"  # two tokens: the engine cannot stop on it by itself
        body = dict(prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
        plain = client.post("/v1/completions", json=body).json()["choices"][0]
        chunks = sse(client, "/v1/completions", {**body, "stream": True})
        sent = [c["choices"][0]["text"] for c in chunks]
        assert "".join(sent) == plain["text"] and stop not in "".join(sent)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop" == plain["finish_reason"]


def test_a_client_that_leaves_a_stream_stops_its_generation(local, monkeypatch):
    """The client reads two events and closes the connection; from the second event on, the
    decoder waits until the server has marked the request cancelled (so it is still busy when
    the client leaves). Its rows must then stop within a few steps, not run on to the budget."""
    import dataclasses

    from megatron.early_exit.server import worker as worker_module

    body = dict(prompt=PROMPT, max_tokens=60, temperature=0)
    with httpx.Client(base_url=local.url, timeout=300) as client:
        real_run_job, results = worker_module.run_job, []

        def slow_run_job(model, job, on_tokens=None, cancelled=None, **kwargs):
            events = []

            def listen(event):
                on_tokens(event)
                events.append(event)
                if len(events) >= 2:
                    wait_until(lambda: bool(cancelled()), timeout=120)

            job = dataclasses.replace(job, stop_tokens=())  # nothing but the budget or the client ends it
            result = real_run_job(model, job, on_tokens=listen if on_tokens else None, cancelled=cancelled, **kwargs)
            results.append(result)
            return result

        monkeypatch.setattr(worker_module, "run_job", slow_run_job)
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as reply:
            seen = 0
            for line in reply.iter_lines():
                seen += line.startswith("data: ")
                if seen == 2:
                    break
        assert wait_until(lambda: results, timeout=120), "the generation did not end"
        monkeypatch.setattr(worker_module, "run_job", real_run_job)
        assert len(results[0].tokens[0]) < 30, len(results[0].tokens[0])  # of the 60 it would run to
        again = client.post("/v1/completions", json=body)  # the server goes on serving
        assert again.status_code == 200 and again.json()["choices"][0]["finish_reason"] in ("length", "stop")
