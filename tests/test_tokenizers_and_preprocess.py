"""Tokenizers (every --tokenizer-type, their errors) and tools/preprocess_data.py.

Tokenizer files are made from a small generated corpus (tests/tokenizer_fixtures.py) with
the same libraries users train with, so the tests need no download. The preprocessing tool runs in a subprocess where
the command line itself is under test, and in-process (through its `main`) elsewhere, since
every new process pays megatron-core's import time.
"""

import json
import os
import random

import numpy
import pytest

from megatron.early_exit.errors import ConfigError
from megatron.early_exit.tokenizers import (
    GPT2_EOD_TOKEN,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    build_tokenizer,
    train_sentencepiece,
)
from tests.tokenizer_fixtures import HARD_TEXT, documents, run_preprocess_cli, sentences, write_jsonl


@pytest.fixture(scope="module")
def byte_level_bpe(corpus_file):
    """A tiny GPT-2-style tokenizer trained with the `tokenizers` library (the reference)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train([corpus_file], vocab_size=400, min_frequency=1, special_tokens=[GPT2_EOD_TOKEN], show_progress=False)
    return bpe


@pytest.fixture(scope="module")
def gpt2_files(byte_level_bpe, tmp_path_factory) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("gpt2")
    vocab, merges = byte_level_bpe.save_model(str(directory))
    return vocab, merges


@pytest.fixture(scope="module")
def hf_dir(byte_level_bpe, tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("hf")
    byte_level_bpe.save(str(directory / "tokenizer.json"))
    return str(directory)


@pytest.fixture(scope="module")
def garbage_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("garbage") / "garbage.model"
    path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(512)))
    return str(path)


# ----------------------------------------------------------------------------- SentencePiece


def test_train_sentencepiece_reserves_special_ids(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 500
    assert (tok.bos, tok.eod, tok.pad) == (1, 2, 3)


def test_sentencepiece_round_trip_keeps_text_exactly(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    for text in ["the quick brown fox", HARD_TEXT, " leading space", ""]:
        ids = tok.tokenize(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.eod not in ids and tok.bos not in ids  # the caller decides where documents end
        assert tok.detokenize(ids) == text
    # Trained pieces are used, not one piece per character.
    assert len(tok.tokenize("the quick brown fox")) < len("the quick brown fox") // 2
    assert tok.detokenize(numpy.array(tok.tokenize("lazy dog"))) == "lazy dog"


def test_train_sentencepiece_errors(corpus_file, tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size 100: too small, needs at least 261"):
        train_sentencepiece(corpus_file, str(tmp_path / "m"), vocab_size=100)
    with pytest.raises(TokenizerError, match="no such file"):
        train_sentencepiece(str(tmp_path / "missing.txt"), str(tmp_path / "m"), vocab_size=300)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TokenizerError, match="empty"):
        train_sentencepiece(str(empty), str(tmp_path / "m"), vocab_size=300)


# ----------------------------------------------------------------------------- GPT-2 BPE


def test_gpt2_bpe_matches_reference_and_round_trips(gpt2_files, byte_level_bpe):
    from tokenizers import ByteLevelBPETokenizer

    vocab, merges = gpt2_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    assert isinstance(tok, GPT2BPETokenizer)
    reference = ByteLevelBPETokenizer(vocab, merges)
    for text in ["the quick brown fox", HARD_TEXT, ""]:
        ids = tok.tokenize(text)
        assert ids == reference.encode(text).ids
        assert tok.detokenize(ids) == text
    assert tok.vocab_size == byte_level_bpe.get_vocab_size()
    assert tok.eod == json.load(open(vocab))[GPT2_EOD_TOKEN]
    assert tok.bos is None and tok.pad is None


def test_gpt2_bpe_encodes_literal_endoftext_as_text(gpt2_files):
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files[0], merge_file=gpt2_files[1])
    ids = tok.tokenize(f"a{GPT2_EOD_TOKEN}b")
    assert tok.eod not in ids
    assert tok.detokenize(ids) == f"a{GPT2_EOD_TOKEN}b"


# ----------------------------------------------------------------------------- Hugging Face


def test_huggingface_tokenizer_json_file_and_directory(hf_dir, byte_level_bpe):
    for path in [hf_dir, os.path.join(hf_dir, "tokenizer.json")]:
        tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=path)
        assert isinstance(tok, HuggingFaceTokenizer)
        ids = tok.tokenize(HARD_TEXT)
        assert ids == byte_level_bpe.encode(HARD_TEXT).ids
        assert tok.detokenize(ids) == HARD_TEXT
        assert tok.eod == byte_level_bpe.token_to_id(GPT2_EOD_TOKEN)
        assert tok.vocab_size == byte_level_bpe.get_vocab_size()


def test_huggingface_special_tokens_from_config_and_post_processor(tmp_path, corpus_file):
    """tokenizer_config.json names eos/bos/pad; the post-processor's BOS is kept, decoding drops it."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing

    bpe = ByteLevelBPETokenizer()
    bpe.train(
        [corpus_file], vocab_size=350, special_tokens=["<unk>", "<s>", "<|im_end|>", "<pad>"], show_progress=False
    )
    bpe.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    bpe.save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "bos_token": {"content": "<s>"}, "pad_token": "<pad>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))

    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    assert (tok.bos, tok.eod, tok.pad) == (1, 2, 3)
    ids = tok.tokenize("lazy dog")
    assert ids[0] == tok.bos and ids[1:] == bpe.encode("lazy dog", add_special_tokens=False).ids
    assert tok.detokenize(ids) == "lazy dog"


def test_huggingface_without_end_of_text_token_is_refused(tmp_path, corpus_file):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train([corpus_file], vocab_size=300, show_progress=False)
    bpe.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="no end-of-text token found"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(TokenizerError, match="special token '</s>' named in tokenizer_config.json is not in"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))


# ----------------------------------------------------------------------------- null


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert isinstance(tok, NullTokenizer)
    assert tok.vocab_size == 100 and tok.eod == 99
    assert tok.tokenize("5 17  3\n99") == [5, 17, 3, 99]
    assert tok.detokenize(numpy.array([5, 17, 3])) == "5 17 3"
    assert tok.tokenize("") == []
    with pytest.raises(ValueError, match="'x' is not an integer token id"):
        tok.tokenize("1 x")
    with pytest.raises(ValueError, match=r"token id 100 is outside \[0, 100\)"):
        tok.tokenize("100")


# ----------------------------------------------------------------------------- bad input


def _write(path, content) -> str:
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


@pytest.mark.parametrize(
    "case, pattern",
    [
        (
            "unknown type",
            r"--tokenizer-type 'BertWordPiece' is not supported; choose one of: "
            r"SentencePieceTokenizer, Llama2Tokenizer, GPT2BPETokenizer, HuggingFaceTokenizer, NullTokenizer",
        ),
        ("sp without model", r"--tokenizer-type SentencePieceTokenizer needs --tokenizer-model"),
        ("sp missing file", r"--tokenizer-model .*nope\.model: no such file"),
        ("sp given a directory", r"--tokenizer-model .*: not a file"),
        (
            "sp given tokenizer.json",
            r"--tokenizer-model .*tokenizer\.json: a JSON file, not a SentencePiece "
            r"model \(for a Hugging Face tokenizer\.json use --tokenizer-type "
            r"HuggingFaceTokenizer\)",
        ),
        ("sp given garbage", r"--tokenizer-model .*garbage\.model: not a SentencePiece model"),
        ("gpt2 without vocab", r"--tokenizer-type GPT2BPETokenizer needs --vocab-file"),
        ("gpt2 without merges", r"--tokenizer-type GPT2BPETokenizer needs --merge-file"),
        ("gpt2 missing merges", r"--merge-file .*nope\.txt: no such file"),
        ("gpt2 garbage vocab", r"--vocab-file .*garbage\.model: not a GPT-2 vocab\.json"),
        ("gpt2 garbage merges", r"--merge-file .*garbage\.model: not GPT-2 BPE merges for --vocab-file"),
        ("gpt2 vocab without eod", r"--vocab-file .*: no <\|endoftext\|> token"),
        ("hf missing", r"--tokenizer-model .*nope: no such file"),
        ("hf directory without json", r"--tokenizer-model .*: directory has no tokenizer\.json"),
        (
            "hf given sp model",
            r"--tokenizer-model .*\.model: not a Hugging Face tokenizer\.json \(not JSON; "
            r"for a SentencePiece \.model use --tokenizer-type SentencePieceTokenizer\)",
        ),
        ("hf given other json", r"--tokenizer-model .*other\.json: not a Hugging Face tokenizer\.json"),
        ("null without size", r"--tokenizer-type NullTokenizer needs --vocab-size"),
    ],
)
def test_bad_tokenizer_input(case, pattern, tmp_path, sp_model, gpt2_files, hf_dir, garbage_file):
    vocab, merges = gpt2_files
    no_eod_vocab = tmp_path / "vocab.json"
    no_eod_vocab.write_text(json.dumps({k: v for k, v in json.load(open(vocab)).items() if k != GPT2_EOD_TOKEN}))
    calls = {
        "unknown type": dict(tokenizer_type="BertWordPiece"),
        "sp without model": dict(tokenizer_type="SentencePieceTokenizer"),
        "sp missing file": dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(tmp_path / "nope.model")),
        "sp given a directory": dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(tmp_path)),
        "sp given tokenizer.json": dict(
            tokenizer_type="SentencePieceTokenizer", tokenizer_model=os.path.join(hf_dir, "tokenizer.json")
        ),
        "sp given garbage": dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=garbage_file),
        "gpt2 without vocab": dict(tokenizer_type="GPT2BPETokenizer", merge_file=merges),
        "gpt2 without merges": dict(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab),
        "gpt2 missing merges": dict(
            tokenizer_type="GPT2BPETokenizer", vocab_file=vocab, merge_file=str(tmp_path / "nope.txt")
        ),
        "gpt2 garbage vocab": dict(tokenizer_type="GPT2BPETokenizer", vocab_file=garbage_file, merge_file=merges),
        "gpt2 garbage merges": dict(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab, merge_file=garbage_file),
        "gpt2 vocab without eod": dict(
            tokenizer_type="GPT2BPETokenizer", vocab_file=str(no_eod_vocab), merge_file=merges
        ),
        "hf missing": dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "nope")),
        "hf directory without json": dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path)),
        "hf given sp model": dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=sp_model),
        "hf given other json": dict(
            tokenizer_type="HuggingFaceTokenizer", tokenizer_model=_write(tmp_path / "other.json", '{"hello": [1, 2]}')
        ),
        "null without size": dict(tokenizer_type="NullTokenizer"),
    }
    with pytest.raises(TokenizerError, match=pattern) as info:
        build_tokenizer(**calls[case])
    assert isinstance(info.value, ConfigError)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- preprocess_data.py


def _outputs(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_cli_round_trip_two_keys_two_workers(tmp_path, sp_model):
    """Every document comes back as tokenize(text) + [eod], in input order, for both keys."""
    texts = sentences(300, seed=1) + [HARD_TEXT]
    records = [{"text": t, "title": f"title {i}", "other": [1, 2]} for i, t in enumerate(texts)]
    records.insert(7, {"text": "", "title": "empty text"})  # empty document: skipped for "text"
    records.insert(9, "")  # blank line: skipped
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    out = tmp_path / "out"
    out.mkdir()
    prefix = str(out / "corpus")

    proc = run_preprocess_cli(
        "--input",
        corpus,
        "--output-prefix",
        prefix,
        "--json-keys",
        "text",
        "title",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        sp_model,
        "--append-eod",
        "--workers",
        "2",
        "--log-interval",
        "100",
    )

    assert proc.returncode == 0, proc.stderr
    assert _outputs(out) == [
        "corpus_text_document.bin",
        "corpus_text_document.idx",
        "corpus_title_document.bin",
        "corpus_title_document.idx",
    ]
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    assert documents(prefix + "_text_document") == [tok.tokenize(t) + [tok.eod] for t in texts]
    titles = [r["title"] for r in records if r]
    assert titles[7] == "empty text"
    assert documents(prefix + "_title_document") == [tok.tokenize(t) + [tok.eod] for t in titles]
    assert "processed 300 documents" in proc.stderr and "docs/s" in proc.stderr and "MB/s" in proc.stderr
    assert f"done: {len(texts) + 1} documents" in proc.stdout
    assert "1 empty skipped" in proc.stdout and "1 blank lines skipped" in proc.stdout


def test_cli_malformed_line_fails_and_leaves_nothing(tmp_path, sp_model):
    records = [{"text": t} for t in sentences(200, seed=2)]
    records.insert(150, '{"text": "unterminated')
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    out = tmp_path / "out"
    out.mkdir()

    proc = run_preprocess_cli(
        "--input",
        corpus,
        "--output-prefix",
        str(out / "corpus"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        sp_model,
        "--workers",
        "2",
    )

    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --input {corpus}, line 151: not valid JSON")
    assert "Traceback" not in proc.stderr
    assert _outputs(out) == []


def _main_in_process(tool, capsys, *args: str) -> tuple[int, str, str]:
    code = tool.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "no documents (the file is empty)"),
        (["", "  "], "no documents (only blank lines)"),
        ([{"text": ""}, {"text": ""}], "no document has any text under 'text'"),
        ([{"text": "a"}, {"body": "b"}], "line 2: no key 'text' (--json-keys text)"),
        ([{"text": "a"}, {"text": 3}], "line 2: 'text' is a int, expected a string"),
        ([{"text": "a"}, "[1, 2]"], "line 2: expected a JSON object, got list"),
    ],
)
def test_preprocess_bad_corpus_leaves_nothing(preprocess_tool, capsys, tmp_path, sp_model, lines, message):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", lines)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = _main_in_process(
        preprocess_tool,
        capsys,
        "--input",
        corpus,
        "--output-prefix",
        str(out / "c"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        sp_model,
    )
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(f"error: --input {corpus}")
    assert message in err
    assert _outputs(out) == []


def test_preprocess_bad_flags(preprocess_tool, capsys, tmp_path, sp_model):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a"}])
    code, _, err = _main_in_process(
        preprocess_tool,
        capsys,
        "--input",
        str(tmp_path / "missing.jsonl"),
        "--output-prefix",
        str(tmp_path / "c"),
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "10",
    )
    assert code == 1 and f"error: --input {tmp_path / 'missing.jsonl'}: no such file" in err
    code, _, err = _main_in_process(
        preprocess_tool,
        capsys,
        "--input",
        corpus,
        "--output-prefix",
        str(tmp_path / "no" / "c"),
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "10",
    )
    assert code == 1 and "error: --output-prefix" in err and "does not exist" in err
    code, _, err = _main_in_process(
        preprocess_tool,
        capsys,
        "--input",
        corpus,
        "--output-prefix",
        str(tmp_path / "c"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
    )
    assert code == 1 and "needs --tokenizer-model" in err
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl"]


def test_preprocess_null_tokenizer_picks_wide_dtype(preprocess_tool, capsys, tmp_path):
    """A vocabulary past uint16 is stored as int32, ids intact; a bad id names its line."""
    corpus = write_jsonl(tmp_path / "ids.jsonl", [{"text": "1 2 69999"}, {"text": "65536  7"}])
    prefix = str(tmp_path / "ids")
    args = [
        "--input",
        corpus,
        "--output-prefix",
        prefix,
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "70000",
        "--append-eod",
    ]
    code, out, _ = _main_in_process(preprocess_tool, capsys, *args)
    assert code == 0
    assert documents(prefix + "_text_document") == [[1, 2, 69999, 69999], [65536, 7, 69999]]
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(prefix + "_text_document").index.dtype == numpy.int32
    assert "(int32)" in out

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "1 2"}, {"text": "1 two"}])
    code, _, err = _main_in_process(
        preprocess_tool, capsys, *args[:1], bad, *args[2:3], str(tmp_path / "bad"), *args[4:]
    )
    assert code == 1 and "line 2: 'text': NullTokenizer: 'two' is not an integer token id" in err
    assert not any(name.startswith("bad_") for name in os.listdir(tmp_path))
