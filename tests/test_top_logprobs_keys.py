"""OpenAI's logprobs contract for every tokenizer type: each position's top_logprobs has the
position's token text (tokens[i]) as a key, and alternatives are rendered the same way, as the
text they would add after the tokens before them (a SentencePiece word-start space kept on both),
for generated tokens, echoed prompt tokens, streamed chunks and chat."""

import asyncio

import pytest

from megatron.early_exit.tokenizers import GPT2_EOD_TOKEN, build_tokenizer, train_sentencepiece

TEXT = "the quick brown fox jumps over the lazy dog again and again"
SENTENCES = [TEXT, "a lazy fox and a quick dog", "brown dogs jump over quick foxes", "over and over again"] * 50


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("tops_tokenizers")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    sp = train_sentencepiece(str(corpus), str(folder / "sp"), vocab_size=300)
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(corpus)], vocab_size=300, min_frequency=1, special_tokens=[GPT2_EOD_TOKEN], show_progress=False)
    vocab, merges = bpe.save_model(str(folder))
    (folder / "hf").mkdir()
    bpe.save(str(folder / "hf" / "tokenizer.json"))
    return {
        "SentencePieceTokenizer": build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp),
        "Llama2Tokenizer": build_tokenizer("Llama2Tokenizer", tokenizer_model=sp),
        "GPT2BPETokenizer": build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges),
        "HuggingFaceTokenizer": build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(folder / "hf")),
        "NullTokenizer": build_tokenizer("NullTokenizer", vocab_size=100),
    }


def _prompt(tokenizer):
    return "5 17 3 8" if tokenizer.type_name == "NullTokenizer" else "the quick"


def _generated(tokenizer):
    ids = tokenizer.tokenize("40 2 77 13" if tokenizer.type_name == "NullTokenizer" else " brown fox jumps over")
    return [t for t in ids if t != getattr(tokenizer, "bos", None)][:4]


def _alternatives(token, vocab):
    """The token among its alternatives (second), and two others."""
    others = [t for t in range(5, vocab) if t != token][:2]
    return [others[0], token, others[1]], [-0.5, -1.0, -2.0]


def _result(tokenizer, tokens):
    from megatron.early_exit.inference import GenerationResult

    tops = [_alternatives(t, tokenizer.vocab_size) for t in tokens]
    return GenerationResult(
        [tokens],
        [[4] * len(tokens)],
        [[-1.0] * len(tokens)],
        4,
        top_tokens=[[ids for ids, _ in tops]],
        top_logprobs=[[lps for _, lps in tops]],
    )


def _scores(prompt_ids, vocab):
    from megatron.early_exit.inference import ScoreResult

    tops = [_alternatives(t, vocab) for t in prompt_ids[1:]]
    return ScoreResult(
        [[-1.0] * (len(prompt_ids) - 1)],
        [[False] * (len(prompt_ids) - 1)],
        [[ids for ids, _ in tops]],
        [[lps for _, lps in tops]],
        4,
    )


def _check(logprobs):
    assert len(logprobs.tokens) == len(logprobs.top_logprobs)
    for token, value, tops in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        if value is None:  # the echoed prompt's first token
            continue
        assert tops[token] == value, (token, tops)
        assert len(tops) == 3


@pytest.mark.parametrize(
    "name", ["SentencePieceTokenizer", "Llama2Tokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer"]
)
def test_each_token_is_a_key_of_its_top_logprobs(tokenizers, name):
    from megatron.early_exit.server.chat_api import chat_completion
    from megatron.early_exit.server.openai_api import completion, read_prompts, stream_chunks
    from megatron.early_exit.server.schemas import ChatRequest, CompletionRequest

    tokenizer = tokenizers[name]
    request = CompletionRequest(prompt=_prompt(tokenizer), max_tokens=8, logprobs=3, echo=True)
    prompts = read_prompts(request, tokenizer)
    generated = _generated(tokenizer)
    result = _result(tokenizer, generated)
    scores = _scores(prompts.ids[0], tokenizer.vocab_size)
    reply, _ = completion(request, tokenizer, "m", prompts, result, scores)
    logprobs = reply.choices[0].logprobs
    _check(logprobs)
    assert len(logprobs.tokens) == len(prompts.ids[0]) + len(generated)
    if name.startswith(("SentencePiece", "Llama2")):  # the case that broke: word-start spaces
        assert any(t.startswith(" ") for t in logprobs.tokens)

    async def streamed():
        from megatron.early_exit.inference.result import TokenEvent

        async def events():
            for j, t in enumerate(generated):
                yield TokenEvent(0, [t], [4], [-1.0], [result.top_tokens[0][j]], [result.top_logprobs[0][j]])
            yield result

        stream = CompletionRequest(prompt=_prompt(tokenizer), max_tokens=8, logprobs=3, stream=True)
        return [c async for c in stream_chunks(stream, tokenizer, "m", prompts, None, events())]

    chunks = [c.choices[0].logprobs for c in asyncio.run(streamed()) if c.choices and c.choices[0].logprobs]
    for lp in chunks:
        _check(lp)
    # Chat: the alternatives' texts are rendered like the chosen token's.
    chat = ChatRequest(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=3, max_tokens=8)
    content = chat_completion(chat, tokenizer, "m", prompts, result).choices[0].logprobs.content
    for item in content:
        assert item.token in [t.token for t in item.top_logprobs]
