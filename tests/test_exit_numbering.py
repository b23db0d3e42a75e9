"""One numbering of exits: requests, replies and token streams name an exit by its
--exit-layer-nums entry (EE-LLM's numbering) and the final layer by num_layers, also under
--pre-exit, where the decoder runs one layer fewer before the head reads. Every exit number a
reply reports is accepted back as a request."""

import json
import threading

import pytest

from tests.helpers import tiny_model_flags, write_random_checkpoint

httpx = pytest.importorskip("httpx")

NUM_LAYERS, EXITS, SEQ, VOCAB = 4, (1, 3), 64, 100


def test_exit_number_of_a_depth():
    from megatron.early_exit.inference.exit_numbers import exit_number

    assert [exit_number(d, 4, pre_exit=False) for d in (1, 3, 4)] == [1, 3, 4]
    assert [exit_number(d, 4, pre_exit=True) for d in (0, 2, 4)] == [1, 3, 4]


@pytest.fixture(scope="module")
def pre_exit_server(dist1, tmp_path_factory):
    from fastapi.testclient import TestClient

    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.server.app import Service, build_app
    from megatron.early_exit.server.jobs import ModelLimits
    from megatron.early_exit.server.worker import Worker

    root = str(tmp_path_factory.mktemp("pre_exit_ckpt"))
    flags = tiny_model_flags(NUM_LAYERS, SEQ, VOCAB, EXITS, seed=3, init_method_std=None) + ["--pre-exit"]
    write_random_checkpoint(root, flags, 128)
    model, tokenizer, _ = load_model(root)
    assert model.ee_config.pre_exit
    worker = Worker(model, max_batch_size=4)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    limits = ModelLimits("tiny", model.vocab_size, NUM_LAYERS, EXITS, SEQ, 4, SEQ - 1)
    with TestClient(build_app(Service(worker, tokenizer, limits)), base_url="http://localhost") as client:
        yield client
    worker.stop()
    thread.join(timeout=30)


def _ok(reply):
    assert reply.status_code == 200, reply.text
    return reply.json()


def _api(client, **fields):
    body = {"prompts": ["5 17 3"], "tokens_to_generate": 4, "top_k": 1, **fields}
    return _ok(client.put("/api", json=body))["exit_layers"][0]


def _completion(client, **fields):
    body = {"prompt": "5 17 3", "max_tokens": 4, "temperature": 0, **fields}
    return _ok(client.post("/v1/completions", json=body))["choices"][0]["exit_layers"]


def _streamed(client, **fields):
    body = {"prompt": "5 17 3", "max_tokens": 4, "temperature": 0, "stream": True, **fields}
    with client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200
        lines = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    return [n for line in lines[:-1] for n in json.loads(line)["choices"][0]["exit_layers"]]


@pytest.mark.parametrize("render", [_api, _completion, _streamed])
def test_reported_exits_are_the_requested_ones_and_go_back_as_requests(pre_exit_server, render):
    client = pre_exit_server
    for exit_num in EXITS:
        # Threshold 0 at one exit: every decoded token leaves there (the first comes from the prompt pass).
        reported = render(client, use_early_exit=True, early_exit_thres=0.0, exit_layers=[exit_num])
        assert reported == [NUM_LAYERS] + [exit_num] * 3
        assert render(client, exit_layer=exit_num) == [NUM_LAYERS] + [exit_num] * 3
    # Every number a reply reported is a valid request (an exit, or the final layer).
    for number in set(reported) | set(EXITS):
        assert render(client, exit_layer=number)
        if number != NUM_LAYERS:
            assert render(client, use_early_exit=True, exit_layers=[number])
