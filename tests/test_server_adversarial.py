"""The server against what a careless or hostile client sends, on a real server process whose
model has a padded vocabulary (a SentencePiece tokenizer of 500 pieces, an embedding of 512
rows): padded ids are never decoded, token-id prompts and text that is not Unicode are
refused naming the field, a stalled body is cut off, a stream that fails ends with an error
event, and 128 concurrent mixed requests (greedy, sampled, streamed, early exit,
speculative, bad ones, clients that leave mid-stream) each get a valid reply or a named 4xx.
"""

import json
import random
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.helpers import wait_until
from tests.server_fixtures import Server

httpx = pytest.importorskip("httpx")

VOCAB, PADDED, SEQ, EXITS = 500, 512, 64, (1, 2)
WORDS = "the quick brown fox jumps over a lazy dog early exit layer token model data train über café 42".split()
PROMPTS = ["the quick brown fox", "early exit layer", "a lazy dog jumps over the data", "über café 42"]


def _sentences(n: int, seed: int = 0):
    rng = random.Random(seed)
    made_up = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(300)]
    words = WORDS * 10 + made_up
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 16))) for _ in range(n)]


@pytest.fixture(scope="module")
def sp_checkpoint(dist1, tmp_path_factory):
    """A random 4-layer model with exits after layers 1 and 2, its vocabulary 500 padded to 512."""
    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.tokenizers import train_sentencepiece
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.trainer import build_model

    root = tmp_path_factory.mktemp("padded")
    text = root / "corpus.txt"
    text.write_text("\n".join(_sentences(2000)) + "\n", encoding="utf-8")
    model_file = train_sentencepiece(str(text), str(root / "tok"), vocab_size=VOCAB)
    args = parse_args(
        [
            "--num-layers",
            "4",
            "--hidden-size",
            "32",
            "--num-attention-heads",
            "4",
            "--seq-length",
            str(SEQ),
            "--micro-batch-size",
            "1",
            "--train-iters",
            "1",
            "--lr",
            "1e-3",
            "--mock-data",
            "--seed",
            "7",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            model_file,
            "--make-vocab-size-divisible-by",
            "128",
            "--normalization",
            "RMSNorm",
            "--swiglu",
            "--disable-bias-linear",
            "--untie-embeddings-and-output-weights",
            "--init-method-std",
            "0.3",
            "--exit-layer-nums",
            *map(str, EXITS),
            "--use-exit-norm",
        ],
        world_size=1,
    )
    ckpt = str(root / "ckpt")
    save_weights(ckpt, vars(args), build_model(build_run_config(args), torch.device("cpu"), PADDED), iteration=1)
    return ckpt, model_file


@pytest.fixture(scope="module")
def server(sp_checkpoint, tmp_path_factory):
    logs = tmp_path_factory.mktemp("padded_log")
    template = logs / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    srv = Server(
        sp_checkpoint[0], str(logs / "server.log"), extra=["--body-read-timeout", "2", "--chat-template", str(template)]
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def error_of(reply, status):
    assert reply.status_code == status, (reply.status_code, reply.text)
    body = reply.json()
    assert set(body) == {"error", "message"} and body["message"] == body["error"]["message"], body
    return body["error"]


def raw_json(client, method, path, body):
    """`body` as JSON with \\u escapes (a lone surrogate travels as the escape \\ud800)."""
    return client.request(method, path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def events_of(lines):
    """The data of each server-sent event up to [DONE] (which must end the stream)."""
    events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def still_serves(client):
    reply = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("length", "stop"), reply.text


# -- padded vocabulary ----------------------------------------------------------------------------------


def test_sampling_never_picks_a_padded_id(client):
    """12 of 512 rows are padding: 8 x 48 nearly uniform draws (temperature 100) hit one almost
    surely, at full depth and at the first exit, unless they are masked."""
    for extra in ({}, {"use_early_exit": True, "early_exit_thres": 0.0}):
        reply = client.put(
            "/api",
            json={"prompts": PROMPTS * 2, "tokens_to_generate": 48, "temperature": 100.0, "random_seed": 3, **extra},
        )
        assert reply.status_code == 200, reply.text
        tokens = [t for row in reply.json()["tokens"] for t in row]
        assert len(tokens) > 8 * 30 and max(tokens) < VOCAB, max(tokens)  # rows stop at the end-of-document token
        if extra:  # every token but the prompt's first leaves at exit 1
            layers = [d for row in reply.json()["exit_layers"] for d in row]
            assert layers.count(1) >= len(layers) - len(PROMPTS) * 2, layers
    body = {"prompt": PROMPTS[0], "max_tokens": 48, "temperature": 2.0, "seed": 5, "logprobs": 3, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200
        chunks = events_of(list(reply.iter_lines()))
    assert all("error" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_token_id_prompts_are_range_checked(client):
    for prompt, field in (
        ([1, 2, 600], "prompt[0]"),
        ([505], "prompt[0]"),
        ([-1], "prompt[0]"),
        ([[3, 4], [2**40]], "prompt[1]"),
    ):
        error = error_of(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}), 400)
        assert error["param"] == field and error["message"].startswith(f"{field}: token ids"), error
        assert "[0, 500)" in error["message"]
    reply = client.post("/v1/completions", json={"prompt": [2**63], "max_tokens": 2})
    assert reply.status_code in (400, 422) and reply.json()["error"]["param"].startswith("prompt"), reply.text
    still_serves(client)


SURROGATES = [  # (method, path, body, field)
    ("POST", "/v1/completions", {"prompt": "a \ud800 b", "max_tokens": 2}, "prompt"),
    ("POST", "/v1/completions", {"prompt": ["ok", "\udfff"], "max_tokens": 2}, "prompt"),
    ("POST", "/v1/completions", {"prompt": "ok", "max_tokens": 2, "stop": ["\ud800"]}, "stop"),
    ("POST", "/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("PUT", "/api", {"prompts": ["fine", "x\ud83d"], "tokens_to_generate": 2}, "prompts"),
    ("PUT", "/api", {"prompts": ["fine"], "tokens_to_generate": 2, "stop_sequences": ["\ud800"]}, "stop_sequences"),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2},
        "messages",
    ),
]


@pytest.mark.parametrize(
    "method,path,body,field", SURROGATES, ids=[f"{p}-{f}-{i}" for i, (_, p, _, f) in enumerate(SURROGATES)]
)
def test_lone_surrogates_are_refused_naming_the_field(client, method, path, body, field):
    error = error_of(raw_json(client, method, path, body), 400)
    assert error["param"] == field and error["message"].startswith(field) and "lone surrogate" in error["message"], (
        error
    )
    still_serves(client)


def test_length_penalty_that_overflows_is_refused(client):
    error = error_of(
        client.put(
            "/api",
            json={
                "prompts": PROMPTS[:1],
                "tokens_to_generate": 4,
                "top_k": 1,
                "beam_width": 1,
                "length_penalty": 1e308,
            },
        ),
        422,
    )
    assert error["param"] == "length_penalty" and error["message"].startswith("length_penalty: "), error
    reply = client.put(
        "/api",
        json={"prompts": PROMPTS[:1], "tokens_to_generate": 4, "top_k": 1, "beam_width": 1, "length_penalty": 10.0},
    )
    assert reply.status_code == 200 and len(reply.json()["scores"]) == 1, reply.text


def test_a_body_that_stops_arriving_is_cut_off(server, client):
    """--body-read-timeout 2: a client that sends half its body and waits gets a 408 and the
    connection is closed (it used to stay open for as long as the client liked)."""
    host, port = server.url[len("http://") :].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=120)
    sock.sendall(
        b"PUT /api HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
        b'{"prompts": ["the'
    )
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:  # the server closed the connection
            break
        data += chunk
    sock.close()
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.split()[1] == b"408", data
    error = json.loads(body)["error"]
    assert error["param"] == "body" and "--body-read-timeout of 2 s" in error["message"], error
    assert client.get("/health").status_code == 200
    still_serves(client)


# -- without a server process -------------------------------------------------------------------------------


def test_an_error_during_a_stream_ends_it_with_an_error_event():
    import asyncio

    from megatron.early_exit.server.jobs import RequestError
    from megatron.early_exit.server.schemas import Health
    from megatron.early_exit.server.streaming import sse as _sse

    async def chunks(err):
        yield Health(queued=0, busy=False, served=1)
        raise err

    async def read(response):
        return [line async for line in response.body_iterator]

    for err, kind, param in (
        (RuntimeError("piece id is out of range"), "server_error", None),
        (RequestError("prompt", "bad"), "invalid_request_error", "prompt"),
    ):
        lines = asyncio.run(read(_sse(chunks(err))))
        assert json.loads(lines[0][len("data: ") :])["served"] == 1
        event = json.loads(lines[1][len("data: ") :])
        assert event["error"]["type"] == kind and event["error"]["param"] == param, event
        assert str(err) in event["error"]["message"] and lines[2:] == ["data: [DONE]\n\n"], lines


def test_tokenizer_flags_fill_in_from_the_stored_tokenizer(sp_checkpoint, tmp_path):
    """Only --tokenizer-model given: the type comes from the checkpoint (it was `None`)."""
    import shutil

    from megatron.early_exit.checkpoint.reader import read_model_config
    from megatron.early_exit.inference.loading import checkpoint_path
    from megatron.early_exit.server.launch import build_tokenizer, parse_args

    ckpt, model_file = sp_checkpoint
    stored = read_model_config(checkpoint_path(ckpt))
    copy = str(tmp_path / "copy.model")
    shutil.copy(model_file, copy)
    tokenizer = build_tokenizer(parse_args(["--load", ckpt, "--tokenizer-model", copy]), stored, PADDED)
    assert type(tokenizer).__name__ == "SentencePieceTokenizer" and tokenizer.vocab_size == VOCAB


# -- many clients at once ------------------------------------------------------------------------------------


def _mixed_request(i: int):
    """(method, path, body, stream, leave_early) of the i-th request: a mix of every kind."""
    prompt = PROMPTS[i % len(PROMPTS)]
    kind = i % 8
    if kind == 0:
        return "PUT", "/api", {"prompts": [prompt], "tokens_to_generate": 8, "top_k": 1}, False, False
    if kind == 1:  # sampled over the padded vocabulary
        return (
            "POST",
            "/v1/completions",
            {"prompt": prompt, "max_tokens": 8, "temperature": 2.0, "seed": i},
            False,
            False,
        )
    if kind == 2:
        return (
            "POST",
            "/v1/completions",
            {"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "stream": True, "logprobs": 2},
            True,
            False,
        )
    if kind == 3:
        return (
            "PUT",
            "/api",
            {
                "prompts": [prompt, prompt],
                "tokens_to_generate": 8,
                "top_k": 1,
                "use_early_exit": True,
                "early_exit_thres": 0.2,
                "temperature": 0.0,
            },
            False,
            False,
        )
    if kind == 4:
        return (
            "POST",
            "/v1/completions",
            {"prompt": prompt, "max_tokens": 8, "temperature": 0, "speculative": {"exit_layer": 1, "num_draft": 3}},
            False,
            False,
        )
    if kind == 5:  # the client leaves after the first event
        return (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "temperature": 0.7, "stream": True},
            True,
            True,
        )
    if kind == 6:
        return (
            "POST",
            "/v1/completions",
            {
                "prompt": prompt,
                "max_tokens": 40,
                "temperature": 1.0,
                "use_early_exit": True,
                "early_exit_thres": 0.0,
                "stream": True,
            },
            True,
            True,
        )
    bad = [
        {"prompt": [7, 600], "max_tokens": 2},
        {"prompt": "x\ud800", "max_tokens": 2},
        {"prompt": prompt, "max_tokens": 2, "speculative": {"exit_layer": 3}},
        {"prompt": prompt, "max_tokens": SEQ},
        {"prompt": prompt, "max_tokens": 2, "temperature": 1e-300},
    ]
    return "POST", "/v1/completions", bad[i // 8 % len(bad)], False, False


def _check_reply(client, i):
    """One request of the mix: a valid reply, or a 4xx naming its field; None when it left."""
    method, path, body, stream, leave = _mixed_request(i)
    if not stream:
        reply = raw_json(client, method, path, body)
        if reply.status_code != 200:
            error = error_of(reply, reply.status_code)
            assert 400 <= reply.status_code < 500 and error["param"], (i, reply.status_code, error)
            return reply.status_code
        data = reply.json()
        if path == "/api":
            assert all(max(row) < VOCAB for row in data["tokens"]) and len(data["text"]) == len(body["prompts"]), data
        else:
            assert data["choices"][0]["finish_reason"] in ("length", "stop"), data
        return 200
    with client.stream(method, path, json=body) as reply:
        assert reply.status_code == 200, (i, reply.read())
        if leave:
            next(line for line in reply.iter_lines() if line.startswith("data: "))
            return None  # leaving the block closes the connection mid-stream
        chunks = events_of(list(reply.iter_lines()))
    assert all("error" not in c for c in chunks), chunks
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop"), chunks[-1]
    return 200


def test_128_concurrent_mixed_requests_each_get_a_valid_reply_or_a_named_4xx(client, server):
    with ThreadPoolExecutor(16) as pool:

        def one(i):
            with httpx.Client(base_url=server.url, timeout=300) as own:
                return _check_reply(own, i)

        statuses = list(pool.map(one, range(128)))
    assert statuses.count(None) == 32 and statuses.count(200) == 80, statuses
    assert sorted(set(statuses) - {None, 200}) == [400, 422], statuses

    def idle():
        health = client.get("/health").json()
        return not (health["busy"] or health["queued"])

    assert wait_until(idle, timeout=120, interval=0.1), client.get("/health").json()  # the decoder comes back idle
    still_serves(client)
