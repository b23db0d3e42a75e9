"""The server on the continuous-batching engine, in this process (uvicorn on a loopback
port, the worker in a thread): a client that disconnects mid-stream aborts its sequence
and frees its slot at the next step; a full queue is a 503 with Retry-After; a request
above the slots' context is a 400 naming the field; /metrics counts what was served; the
server keeps serving through all of it. No timing is asserted: the decode loop is held
or slowed by wrapping the engine's step."""

import json
import threading
import time

import pytest

from tests.helpers import wait_until
from tests.server_fixtures import EXITS, NUM_LAYERS, InProcessServer, write_checkpoint

httpx = pytest.importorskip("httpx")

SEQ, SLOTS = 96, 2
PROMPT = "5 17 3"


class LocalServer(InProcessServer):
    def __init__(self, model, tokenizer):
        from megatron.early_exit.inference.engine import Engine
        from megatron.early_exit.server.app import Service
        from megatron.early_exit.server.continuous import ContinuousWorker
        from megatron.early_exit.server.jobs import ModelLimits

        limits = ModelLimits("tiny", model.vocab_size, NUM_LAYERS, tuple(EXITS), SEQ, SLOTS, SEQ - 1)
        self.engine = Engine(model, SLOTS, SEQ, prefill_chunk=8, max_waiting=1)
        worker = ContinuousWorker(self.engine, model, max_queued=4)
        super().__init__(Service(worker, tokenizer, limits), worker)


@pytest.fixture(scope="module")
def local(dist1, tmp_path_factory):
    from megatron.early_exit.inference.loading import load_model

    root = str(tmp_path_factory.mktemp("continuous_ckpt"))
    write_checkpoint(root, seq_length=SEQ)
    srv = LocalServer(*load_model(root)[:2])
    yield srv
    srv.close()


@pytest.fixture
def steps(local, monkeypatch):
    """Wraps the engine's step: records each plan's aborts with the step they come in, and
    lets a test hold the loop (`gate`) or slow it down (`pause` seconds a step)."""
    record = {"aborts": [], "gate": threading.Event(), "entered": threading.Event(), "pause": 0.0}
    record["gate"].set()
    execute = local.engine.execute

    def wrapped(plan):
        record["entered"].set()
        record["gate"].wait(120)
        time.sleep(record["pause"])
        if plan.abort:
            record["aborts"].append((local.engine.num_steps, list(plan.abort), dict(local.engine.running)))
        return execute(plan)

    monkeypatch.setattr(local.engine, "execute", wrapped)
    yield record
    record["gate"].set()


def test_disconnected_stream_frees_its_slot_at_the_next_step(local, steps):
    steps["pause"] = 0.02  # the client's disconnect is seen long before 80 tokens are decoded
    body = dict(prompt=PROMPT, max_tokens=80, temperature=0, stream=True)
    with httpx.Client(base_url=local.url, timeout=120) as client:
        with client.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200
            for line in reply.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["exit_layers"]:
                    break  # one decoded token received: hang up
        wait_until(lambda: steps["aborts"], timeout=60, interval=0.01)
        steps["pause"] = 0.0
        assert steps["aborts"], "the disconnect did not abort the sequence"
        step, aborted, running = steps["aborts"][0]
        seq = running[aborted[0]]
        assert len(seq.result.tokens[0]) < 80 and seq.finish_reason == "abort"
        # Left at the step the abort was planned for: its slot is free for the next sequence.
        assert seq.seq_id not in local.engine.running and seq.slot in local.engine.free_slots
        plain = client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 8})
        assert plain.status_code == 200 and plain.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_full_queue_is_a_503_and_the_server_goes_on(local, steps):
    steps["gate"].clear()  # hold the decode loop inside the step that admits the first request
    steps["entered"].clear()
    body = dict(prompt=PROMPT, max_tokens=4, temperature=0)
    with httpx.Client(base_url=local.url, timeout=120) as client:
        results = []
        first = threading.Thread(target=lambda: results.append(client.post("/v1/completions", json=body)))
        first.start()
        assert steps["entered"].wait(60)
        second = threading.Thread(target=lambda: results.append(client.post("/v1/completions", json=body)))
        second.start()
        assert wait_until(lambda: local.engine.num_waiting >= 1, timeout=60, interval=0.01)
        refused = client.post("/v1/completions", json=body)  # one waits already (max_waiting 1)
        steps["gate"].set()
        first.join(60), second.join(60)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert "--max-queued-requests" in refused.json()["error"]["message"]
        assert [r.status_code for r in results] == [200, 200]
        assert client.post("/v1/completions", json=body).status_code == 200


def test_self_speculative_request_gives_way_to_the_batch_between_rounds(local, monkeypatch):
    """A self-speculative request runs in its own lane; after each draft-and-verify round the
    engine takes a step, so a request arriving meanwhile is served before the long one ends.
    Both get the tokens they get alone."""
    spec = dict(prompt=PROMPT, max_tokens=40, temperature=0, speculative={"exit_layer": 1, "num_draft": 3})
    plain = dict(prompt="40 2 77 13", max_tokens=3, temperature=0)
    rounds, started = [], threading.Event()
    between = local.worker._between_rounds

    def recorded():
        if not rounds:  # hold the first round until the plain request waits in the engine
            started.set()
            assert wait_until(lambda: local.engine.has_work, timeout=60, interval=0.01)
        between()
        rounds.append(local.engine.num_steps)

    with httpx.Client(base_url=local.url, timeout=120) as client:
        alone = [client.post("/v1/completions", json=body).json() for body in (spec, plain)]
        monkeypatch.setattr(local.worker, "_between_rounds", recorded)
        done = []
        long = threading.Thread(target=lambda: done.append(("spec", client.post("/v1/completions", json=spec))))
        long.start()
        assert started.wait(60)
        done.append(("plain", client.post("/v1/completions", json=plain)))
        long.join(120)
    assert [name for name, _ in done] == ["plain", "spec"]
    assert all(reply.status_code == 200 for _, reply in done)
    for (_, reply), ref in zip(sorted(done, key=lambda d: d[0] != "spec"), alone):
        assert reply.json()["choices"][0]["text"] == ref["choices"][0]["text"]
        assert reply.json()["choices"][0]["exit_layers"] == ref["choices"][0]["exit_layers"]
    assert rounds[-1] > rounds[0] and len(rounds) >= 10  # engine steps came between the rounds


def test_context_above_the_slots_is_a_400_naming_the_field(local):
    with httpx.Client(base_url=local.url, timeout=120) as client:
        reply = client.post("/v1/completions", json=dict(prompt=PROMPT, max_tokens=SEQ, temperature=0))
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"
        assert client.post("/v1/completions", json=dict(prompt=PROMPT, max_tokens=3)).status_code == 200


def test_metrics_count_what_was_served(local):
    from prometheus_client.parser import text_string_to_metric_families

    def read(client):
        families = text_string_to_metric_families(client.get("/metrics").text)
        return {s.name + str(sorted(s.labels.items())): s.value for f in families for s in f.samples}

    with httpx.Client(base_url=local.url, timeout=120) as client:
        before = read(client)
        replies = [
            client.post(
                "/v1/completions",
                json=dict(prompt=p, max_tokens=6, temperature=0, use_early_exit=True, early_exit_thres=0.16),
            ).json()
            for p in (PROMPT, "40 2 77 13")
        ]
        after = read(client)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    exits = [d for r in replies for d in r["choices"][0]["exit_layers"]]
    generated = sum(r["usage"]["completion_tokens"] for r in replies)
    assert delta("early_exit:generation_tokens_total[]") == generated
    assert delta("early_exit:prompt_tokens_total[]") == sum(r["usage"]["prompt_tokens"] for r in replies)
    assert delta("early_exit:time_to_first_token_seconds_count[]") == 2
    assert delta("early_exit:inter_token_latency_seconds_count[]") == generated - 2
    assert delta("early_exit:e2e_request_latency_seconds_count[]") == 2
    by_exit = {d: delta(f"early_exit:exit_tokens_total[('exit_layer', '{d}')]") for d in (*EXITS, NUM_LAYERS)}
    assert sum(by_exit.values()) == generated and len(set(exits)) > 1
    for depth in set(exits):  # the reply's tokens (the end-of-document token, when hit, is not shown)
        assert by_exit[depth] >= exits.count(depth)
    assert after["early_exit:num_requests_running[]"] == 0 and after["early_exit:num_requests_waiting[]"] == 0


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(local, monkeypatch):
    from megatron.early_exit.inference import decoder as decoder_module

    step = decoder_module.Decoder.step

    def broken(self, *args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(decoder_module.Decoder, "step", broken)
    with httpx.Client(base_url=local.url, timeout=120) as client:
        reply = client.post("/v1/completions", json=dict(prompt=PROMPT, max_tokens=4, temperature=0))
        assert reply.status_code == 500 and "injected failure" in reply.json()["error"]["message"]
    monkeypatch.setattr(decoder_module.Decoder, "step", step)
    with httpx.Client(base_url=local.url, timeout=120) as client:  # a 500 closes its connection
        assert client.post("/v1/completions", json=dict(prompt=PROMPT, max_tokens=4)).status_code == 200
    assert local.engine.num_running == 0 and sorted(local.engine.free_slots) == list(range(SLOTS))
