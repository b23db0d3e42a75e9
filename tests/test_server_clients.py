"""The server as a drop-in for the clients researchers use: lm-eval's local-completions and
remote tokenizer, OpenAI's completions and chat clients, Megatron-LM's and EE-LLM's PUT /api
and Megatron-LM's CLI; against score() and generate() on the same checkpoint in this process.

The session's shared server process (tests/server_fixtures.py's tiny checkpoint, a chat
template file, NullTokenizer: text is token ids).
"""

import json
import math

import pytest

from tests.server_fixtures import EOD, EXITS, MAX_BATCH, NUM_LAYERS, PROMPTS, ids, put_api

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def engine(server, server_engine):
    return server_engine


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def scored(engine, prompts, exit_layer=None, top_n=0):
    from megatron.early_exit.inference.scoring import score

    return score(engine[0], [ids(p) if isinstance(p, str) else p for p in prompts], exit_layer, top_n)


def post(client, path, **body):
    reply = client.post(path, json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


# -- OpenAI completions: prompt scoring, alternatives, one exit ------------------------------------


def test_echo_logprobs_score_the_prompt_with_real_alternatives(client, engine):
    from megatron.early_exit.inference import EarlyExit, generate

    _, tokenizer = engine
    ref = scored(engine, PROMPTS, top_n=20)
    reply = post(client, "/v1/completions", prompt=PROMPTS, max_tokens=0, echo=True, logprobs=20)
    for i, (prompt, choice) in enumerate(zip(PROMPTS, reply["choices"])):
        lp = choice["logprobs"]
        assert choice["text"] == prompt and "".join(lp["tokens"]) == prompt
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], ref.logprobs[i])) < 1e-5
        for top, ref_ids, ref_lps in zip(lp["top_logprobs"][1:], ref.top_tokens[i], ref.top_logprobs[i]):
            assert len(top) >= 20
            # Keyed as the tokens are rendered: the text each adds after the one before (its separator).
            expected = {" " + tokenizer.detokenize([t]): v for t, v in zip(ref_ids, ref_lps)}
            assert all(abs(top[k] - v) < 1e-5 for k, v in expected.items())
        # lm-eval's greedy test: the token's value is the largest of its alternatives exactly when it is the argmax
        assert [
            lp["token_logprobs"][t] == max(lp["top_logprobs"][t].values()) for t in range(1, len(lp["tokens"]))
        ] == ref.greedy[i]
    assert reply["usage"]["completion_tokens"] == 0

    # echo + generation: the prompt's scores, then the generated tokens' with their alternatives.
    both = post(client, "/v1/completions", prompt=PROMPTS[0], max_tokens=5, echo=True, logprobs=3, temperature=0)
    lp = both["choices"][0]["logprobs"]
    gen = generate(engine[0], [ids(PROMPTS[0])], max_new_tokens=5, stop_tokens=(EOD,), top_n=3)
    n = len(ids(PROMPTS[0]))
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:n], ref.logprobs[0])) < 1e-5
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][n:], gen.logprobs[0])) < 1e-4
    assert [
        set(t) >= {" " + tokenizer.detokenize([x]) for x in alt}
        for t, alt in zip(lp["top_logprobs"][n:], gen.top_tokens[0])
    ] == [True] * len(gen.tokens[0])

    # exit_layer: scoring and generation with one exit's head
    exit1 = post(client, "/v1/completions", prompt=PROMPTS, max_tokens=0, echo=True, logprobs=1, exit_layer=EXITS[0])
    ref1 = scored(engine, PROMPTS, exit_layer=EXITS[0])
    for i, choice in enumerate(exit1["choices"]):
        assert max(abs(a - b) for a, b in zip(choice["logprobs"]["token_logprobs"][1:], ref1.logprobs[i])) < 1e-5
    assert ref1.logprobs != ref.logprobs
    generated = post(client, "/v1/completions", prompt=PROMPTS[1], max_tokens=6, temperature=0, exit_layer=EXITS[0])
    direct = generate(engine[0], [ids(PROMPTS[1])], EarlyExit(0.0, exit_layers=(EXITS[0],)), 6, stop_tokens=(EOD,))
    assert (
        generated["choices"][0]["exit_layers"] == direct.exit_layers[0][: len(generated["choices"][0]["exit_layers"])]
    )
    assert set(direct.exit_layers[0][1:]) == {EXITS[0]}
    final = post(client, "/v1/completions", prompt=PROMPTS, max_tokens=0, echo=True, logprobs=1, exit_layer=NUM_LAYERS)
    assert [c["logprobs"]["token_logprobs"] for c in final["choices"]] == [
        c["logprobs"]["token_logprobs"] for c in reply["choices"]
    ]


def test_lm_eval_payloads_and_remote_tokenizer(server, client, engine):
    """What lm-eval's local-completions sends for a loglikelihood request (token ids, echo,
    max_tokens 1, logprobs 1), read back with its own parse_logprobs; its RemoteTokenizer."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.utils import RemoteTokenizer

    context, continuation = ids("5 17 3 8"), ids("40 2")
    payload = {
        "model": "tiny",
        "prompt": [context + continuation],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    reply = post(client, "/v1/completions", **payload)
    ((logprob, greedy),) = LocalCompletionsAPI.parse_logprobs(
        reply, tokens=[context + continuation], ctxlens=[len(context)]
    )
    ref = scored(engine, [context + continuation])
    assert abs(logprob - sum(ref.logprobs[0][len(context) - 1 :])) < 1e-4
    assert greedy == all(ref.greedy[0][len(context) - 1 :])
    # Continue the context with each position's argmax: the whole continuation is greedy.
    seq = list(context)
    for _ in range(2):
        seq.append(scored(engine, [seq + [0]], top_n=1).top_tokens[0][-1][0])
    reply = post(client, "/v1/completions", **{**payload, "prompt": [seq]})
    assert LocalCompletionsAPI.parse_logprobs(reply, tokens=[seq], ctxlens=[len(context)])[0][1] is True

    remote = RemoteTokenizer(server.url + "/v1/completions")
    assert remote.encode("5 17 3") == [5, 17, 3] and remote.decode([5, 17, 3]) == "5 17 3"
    assert remote.eos_token_id == EOD and remote.bos_token_id is None
    assert remote.apply_chat_template([{"role": "user", "content": "7 8"}]) == "7 8 1 "
    info = client.get("/tokenizer_info").json()
    assert (
        info["eos_token"] == str(EOD)
        and info["model_max_length"] == 64
        and info["chat_template"]
        == "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}1 {% endif %}"
    )


# -- PUT /api: Megatron-LM's and EE-LLM's fields -------------------------------------------------------


def test_api_scoring_alignment_segments_and_exit_layer(client, engine):
    _, tokenizer = engine
    ref = scored(engine, PROMPTS)
    reply = put_api(client, prompts=PROMPTS, tokens_to_generate=0)
    assert reply["text"] == PROMPTS and reply["tokens"] == [ids(p) for p in PROMPTS]
    assert [len(lp) for lp in reply["logprobs"]] == [len(ids(p)) - 1 for p in PROMPTS]
    assert max(abs(a - b) for r, o in zip(ref.logprobs, reply["logprobs"]) for a, b in zip(r, o)) < 1e-5
    exit1 = put_api(client, prompts=PROMPTS, tokens_to_generate=0, exit_layer=EXITS[0])
    ref1 = scored(engine, PROMPTS, exit_layer=EXITS[0])
    assert max(abs(a - b) for r, o in zip(ref1.logprobs, exit1["logprobs"]) for a, b in zip(r, o)) < 1e-5

    both = put_api(client, prompts=PROMPTS[0], tokens_to_generate=6, top_k=1, logprobs=True)  # one prompt as a string
    n = len(ids(PROMPTS[0]))
    assert len(both["logprobs"][0]) == len(both["tokens"][0]) - 1
    assert max(abs(a - b) for a, b in zip(both["logprobs"][0][: n - 1], ref.logprobs[0])) < 1e-5
    assert "".join(both["segments"][0]) == both["text"][0]
    bare = put_api(client, prompts=[PROMPTS[0]], tokens_to_generate=6, top_k=1, logprobs=True, echo_prompts=False)
    assert bare["logprobs"][0] == pytest.approx(both["logprobs"][0][n - 1 :], abs=1e-5)
    assert "".join(bare["segments"][0]) == bare["text"][0] and bare["text"][0].startswith(" ")


def test_api_megatron_and_ee_llm_fields(client, engine):
    _, tokenizer = engine
    greedy = put_api(client, prompts=[PROMPTS[1]], tokens_to_generate=8, top_k=1, logprobs=True)
    generated = greedy["tokens"][0][len(ids(PROMPTS[1])) :]
    beam = put_api(client, prompts=[PROMPTS[1]], tokens_to_generate=8, beam_width=1, length_penalty=0.5)
    assert beam["tokens"] == greedy["tokens"]
    gen_logprobs = greedy["logprobs"][0][len(ids(PROMPTS[1])) - 1 :]
    assert beam["scores"][0] == pytest.approx(sum(gen_logprobs) / len(generated) ** 0.5, abs=1e-5)
    stopped = put_api(client, prompts=[PROMPTS[1]], tokens_to_generate=8, top_k=1, stop_token=generated[2])
    first = generated.index(generated[2])
    assert stopped["tokens"][0][len(ids(PROMPTS[1])) :] == generated[: first + 1]
    same = put_api(
        client,
        prompts=[PROMPTS[1]],
        tokens_to_generate=8,
        top_k=1,
        prevent_newline_after_colon=False,
        length_penalty=1.0,
        no_log=True,
    )
    assert same["tokens"] == greedy["tokens"]


def test_megatron_cli_reads_the_message_of_every_error(server):
    """Megatron-LM's tools/text_generation_cli.py prints response.json()['message'] on any error."""
    requests = pytest.importorskip("requests")
    url = server.url + "/api"
    headers = {"Content-Type": "application/json"}
    cases = [
        (requests.put, url, {"prompts": ["5 17 3"], "tokens_to_generate": 4, "beam_width": 2}, 400, "beam_width"),
        (requests.put, url, {"prompts": ["5 hello"], "tokens_to_generate": 4}, 400, "prompts[0]"),
        (requests.put, url, {"prompts": ["5 17 3"], "tokens_to_generate": "four"}, 422, "tokens_to_generate"),
        (requests.get, url, None, 405, "GET /api"),
        (requests.put, server.url + "/nowhere", {"prompts": ["5"]}, 404, "PUT /nowhere"),
    ]
    for method, target, data, status, field in cases:
        response = method(target, data=None if data is None else json.dumps(data), headers=headers, timeout=60)
        assert response.status_code == status
        message = response.json()["message"]  # as the client reads it
        assert message.startswith(field) and response.json()["error"]["message"] == message


# -- vLLM's tokenizer endpoints --------------------------------------------------------------------------


def test_tokenize_and_detokenize(client):
    reply = post(client, "/tokenize", prompt="5 17 3", add_special_tokens=False, return_token_strs=True)
    assert reply == {"count": 3, "max_model_len": 64, "tokens": [5, 17, 3], "token_strs": ["5", "17", "3"]}
    chat = post(client, "/tokenize", messages=[{"role": "user", "content": "5 17"}])
    assert chat["tokens"] == [5, 17, 1]
    assert post(client, "/detokenize", tokens=[5, 17, 3]) == {"prompt": "5 17 3"}
    paths = set(client.get("/openapi.json").json()["paths"])
    assert {"/v1/chat/completions", "/tokenizer_info", "/tokenize", "/detokenize"} <= paths


# -- OpenAI chat completions -----------------------------------------------------------------------------


def test_chat_completions_with_the_openai_client(server, engine):
    openai = pytest.importorskip("openai")
    from megatron.early_exit.inference import generate

    _, tokenizer = engine
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "3 3"}, {"role": "user", "content": "5 17"}]
    reply = api.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    prompt = ids("3 3 5 17 1")
    ref = generate(engine[0], [prompt], max_new_tokens=8, stop_tokens=(EOD,))
    tokens = ref.tokens[0][:-1] if ref.tokens[0][-1] == EOD else ref.tokens[0]
    expected = tokenizer.detokenize(prompt + tokens)[len(tokenizer.detokenize(prompt)) :]
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    assert len(reply.choices[0].logprobs.content) == len(tokens)
    assert all(len(t.top_logprobs) == 2 for t in reply.choices[0].logprobs.content)
    assert reply.usage.prompt_tokens == len(prompt)
    stream = api.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    with pytest.raises(openai.BadRequestError, match="messages"):
        api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "five"}], max_tokens=2)


def test_chat_without_a_template_is_a_400_naming_it():
    from fastapi.testclient import TestClient

    from megatron.early_exit.server.app import Service, build_app
    from megatron.early_exit.server.jobs import ModelLimits
    from megatron.early_exit.tokenizers import NullTokenizer

    class NoWorker:
        queued, busy, served = 0, False, 0

        def submit(self, job):
            raise AssertionError("nothing may reach the engine")

    limits = ModelLimits("tiny", 128, NUM_LAYERS, tuple(EXITS), 64, MAX_BATCH, 40)
    with TestClient(build_app(Service(NoWorker(), NullTokenizer(100), limits)), base_url="http://localhost") as local:
        body = {"messages": [{"role": "user", "content": "5 17"}]}
        for path in ("/v1/chat/completions", "/tokenize"):
            reply = local.post(path, json=body)
            assert reply.status_code == 400 and "no chat template" in reply.json()["message"], reply.text
            assert reply.json()["error"]["param"] == "messages"
        assert local.get("/tokenizer_info").json()["chat_template"] is None


# -- bad inputs to every new endpoint and field ---------------------------------------------------------

BAD = [  # (method, path, body, the field the error names)
    ("POST", "/v1/completions", {"prompt": "5 17 3", "max_tokens": 0}, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "5 17 3", "logprobs": 21}, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "5 17 3", "echo": True, "logprobs": 1, "exit_layer": 3}, "exit_layer"),
    ("POST", "/v1/completions", {"prompt": "5 17 3", "exit_layer": 1, "use_early_exit": True}, "exit_layer"),
    ("POST", "/v1/completions", {"prompt": "5 17 3", "exit_layer": "1"}, "exit_layer"),
    ("PUT", "/api", {"prompts": ["5 17 3"], "tokens_to_generate": -1}, "tokens_to_generate"),
    ("PUT", "/api", {"prompts": ["5 17 3"], "tokens_to_generate": 4, "beam_width": 2}, "beam_width"),
    ("PUT", "/api", {"prompts": ["5 17 3", "5"], "beam_width": 1}, "beam_width"),
    ("PUT", "/api", {"prompts": ["5 17 3"], "tokens_to_generate": 4, "beam_width": 0}, "beam_width"),
    ("PUT", "/api", {"prompts": ["5 17 3"], "tokens_to_generate": 4, "length_penalty": "long"}, "length_penalty"),
    ("PUT", "/api", {"prompts": ["5 17 3"], "tokens_to_generate": 4, "stop_token": 500}, "stop_token"),
    ("PUT", "/api", {"prompts": ["5 17 3"], "tokens_to_generate": 4, "stop_token": -2}, "stop_token"),
    (
        "PUT",
        "/api",
        {"prompts": ["5 17 3"], "tokens_to_generate": 4, "prevent_newline_after_colon": True},
        "prevent_newline_after_colon",
    ),  # NullTokenizer text has no ':' token
    (
        "PUT",
        "/api",
        {"prompts": ["5 17 3"], "tokens_to_generate": 4, "prevent_newline_after_colon": "yes"},
        "prevent_newline_after_colon",
    ),
    ("PUT", "/api", {"prompts": ["5 17 3"], "tokens_to_generate": 0, "exit_layer": 3}, "exit_layer"),
    ("PUT", "/api", {"prompts": [""], "tokens_to_generate": 0}, "prompts[0]"),
    ("POST", "/tokenize", {"prompt": "hello"}, "prompt"),
    ("POST", "/tokenize", {}, "prompt"),
    ("POST", "/tokenize", {"prompt": "5", "messages": [{"role": "user", "content": "5"}]}, "prompt"),
    ("POST", "/tokenize", {"prompt": "5", "add_special_tokens": "no"}, "add_special_tokens"),
    ("POST", "/detokenize", {"tokens": [5, 500]}, "tokens[1]"),
    ("POST", "/detokenize", {"tokens": "5 17"}, "tokens"),
    ("POST", "/v1/chat/completions", {"messages": []}, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "5"}]}, "messages.0.role"),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "5"}], "top_logprobs": 2},
        "top_logprobs",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "5"}], "top_logprobs": 21, "logprobs": True},
        "top_logprobs",
    ),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "5"}], "max_tokens": 100}, "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "5"}], "n": 2}, "n"),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "5"}], "stream": True, "exit_layer": 3},
        "exit_layer",
    ),
    ("GET", "/tokenizer_info/x", None, "GET /tokenizer_info/x"),
    ("DELETE", "/tokenize", None, "DELETE /tokenize"),
]


@pytest.mark.parametrize("method,path,body,field", BAD, ids=[f"{p}-{f}-{i}" for i, (_, p, _, f) in enumerate(BAD)])
def test_bad_inputs_get_4xx_naming_the_field_and_the_server_goes_on(client, method, path, body, field):
    reply = client.request(method, path, json=body) if body is not None else client.request(method, path)
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)
    message = reply.json()["message"]
    assert message.startswith(field) or f"{field}:" in message, message
    assert post(client, "/tokenize", prompt="5 17")["tokens"] == [5, 17]
    assert put_api(client, prompts=["5 17 3"], tokens_to_generate=2, top_k=1)["tokens"][0][:3] == [5, 17, 3]
    assert math.isfinite(put_api(client, prompts=["5 17 3"], tokens_to_generate=0)["logprobs"][0][0])


# -- a Hugging Face tokenizer: its chat template, special-token texts, the newline-after-colon ban ----


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from megatron.early_exit.tokenizers import build_tokenizer

    folder = tmp_path_factory.mktemp("hf_tok")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3, ":": 4, "\n": 5, "user": 6, "assistant": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r":|\n| +"), behavior="isolated")
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{{ eos_token }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "bos_token": "<s>", "chat_template": template})
    )
    return build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(folder))


def test_hf_tokenizer_chat_template_and_special_tokens(hf_tokenizer):
    from megatron.early_exit.server.jobs import ModelLimits
    from megatron.early_exit.server.schemas import ChatMessage, TokenizeRequest
    from megatron.early_exit.server.tokenizer_api import TokenizerFacts, find_chat_template, tokenize

    facts = TokenizerFacts(hf_tokenizer, find_chat_template(hf_tokenizer))
    info = facts.info(ModelLimits("hf", 64, 4, (2,), 32, 4, 31))
    assert (info.eos_token, info.bos_token, info.model_max_length) == ("</s>", "<s>", 32)
    assert info.chat_template.startswith("{{ bos_token }}")
    assert facts.render_chat([ChatMessage(role="user", content="hi")]) == "<s>user:hi</s>"
    limits = ModelLimits("hf", 64, 4, (2,), 32, 4, 31)
    assert tokenize(TokenizeRequest(prompt="</s>", add_special_tokens=False), facts, limits).tokens == [2]
    assert tokenize(TokenizeRequest(prompt="hi", add_special_tokens=True), facts, limits).tokens == [1, 3]
    chat = tokenize(TokenizeRequest(messages=[{"role": "user", "content": "hi"}]), facts, limits)
    assert chat.tokens == [1, 6, 4, 3, 2]


def test_prevent_newline_after_colon_bans_that_pair(hf_tokenizer):
    from megatron.early_exit.server.jobs import ModelLimits
    from megatron.early_exit.server.megatron_api import api_jobs
    from megatron.early_exit.server.schemas import ApiRequest

    limits = ModelLimits("hf", 64, 4, (2,), 32, 4, 31)
    jobs = api_jobs(
        ApiRequest(prompts="user:hi", tokens_to_generate=4, prevent_newline_after_colon=True), hf_tokenizer, limits
    )
    assert jobs.generate.sampling.ban_after == ((4, 5),)
    plain = api_jobs(ApiRequest(prompts="user:hi", tokens_to_generate=4), hf_tokenizer, limits)
    assert plain.generate.sampling.ban_after == ()
