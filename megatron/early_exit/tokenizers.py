"""Text tokenizers behind Megatron-LM's `--tokenizer-type` names, with one small interface.

Every tokenizer offers `tokenize(text) -> list[int]`, `detokenize(ids) -> str`, and the ids
the data pipeline needs: `vocab_size`, `eod` (appended after each document), `bos` and `pad`
(an id, or None when the vocabulary has none).

They are thin wrappers over the libraries that define the formats: `sentencepiece` for
SentencePiece models and Hugging Face's `tokenizers` for GPT-2 BPE files and `tokenizer.json`.
megatron-core 0.16.1 ships tokenizer wrappers too, but its Hugging Face and GPT-2 ones need
`transformers` (and a download for GPT-2), and its null tokenizer counts the vocabulary
differently, so the project keeps these small ones. A bad file or a missing flag raises a
`TokenizerError` naming the flag and the path.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Iterable, Sequence

from megatron.early_exit.errors import ConfigError

GPT2_EOD_TOKEN = "<|endoftext|>"

# End-of-text names tried, in order, when a tokenizer.json comes without tokenizer_config.json.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "<|startoftext|>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


class TokenizerError(ConfigError):
    """A tokenizer cannot be built from the given flags or files."""


class Tokenizer(ABC):
    """The interface the data pipeline, training and inference rely on."""

    #: The `--tokenizer-type` name that builds this class.
    type_name: str = ""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (no end-of-document id; the caller appends `eod`)."""

    @abstractmethod
    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of `ids`; accepts lists, numpy arrays and tensors."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """One more than the largest id this tokenizer can produce."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """The id that ends a document."""

    @property
    def bos(self) -> int | None:
        """The beginning-of-sequence id, or None."""
        return None

    @property
    def pad(self) -> int | None:
        """The padding id, or None."""
        return None

    @property
    def eos(self) -> int:
        """Same as `eod` (megatron-core's datasets look for both names)."""
        return self.eod

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What megatron-core's dataset cache hashes to tell tokenizers apart."""
        return OrderedDict({"class": f"{type(self).__module__}.{type(self).__qualname__}", **self._identity()})

    def _identity(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod})"


def _as_int_list(ids: Iterable[int]) -> list[int]:
    """Plain Python ints from a list, numpy array or tensor, as the libraries want."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


def _require_flag(value: str | None, flag: str, tokenizer_type: str, what: str) -> str:
    if not value:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs {flag} ({what})")
    return value


def _require_file(path: str, flag: str) -> str:
    if not os.path.exists(path):
        raise TokenizerError(f"{flag} {path}: no such file")
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path}: not a file")
    return path


def _head(path: str, size: int = 64) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _looks_like_json(path: str) -> bool:
    return _head(path).lstrip().startswith((b"{", b"["))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file; the end of a document is the model's `eos` piece.

    Encoding adds no bos/eos itself (like Megatron-LM's GPTSentencePieceTokenizer), so that the
    preprocessing tool decides where documents end.
    """

    type_name = "SentencePieceTokenizer"

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        self.model_file = _require_file(model_file, "--tokenizer-model")
        if _looks_like_json(model_file):
            raise TokenizerError(
                f"--tokenizer-model {model_file}: a JSON file, not a SentencePiece model "
                "(for a Hugging Face tokenizer.json use --tokenizer-type HuggingFaceTokenizer)"
            )
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(
                f"--tokenizer-model {model_file}: not a SentencePiece model ({_first_line(exc)})"
            ) from None
        if self._sp.eos_id() < 0:
            raise TokenizerError(
                f"--tokenizer-model {model_file}: the model has no eos piece to end documents "
                "(train it with eos_id >= 0)"
            )

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode(_as_int_list(ids))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int | None:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    @property
    def pad(self) -> int | None:
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else None

    def _identity(self) -> dict:
        return {"tokenizer_model": os.path.abspath(self.model_file)}


class Llama2Tokenizer(SentencePieceTokenizer):
    """Llama 2's SentencePiece model with Llama's special ids, as Megatron-LM's Llama2Tokenizer:
    every text starts with the `bos` id (`<s>`), a document ends with `eos` (`</s>`, appended
    by the caller), and `pad` is the model's (Llama 2 has none)."""

    type_name = "Llama2Tokenizer"

    def __init__(self, model_file: str) -> None:
        super().__init__(model_file)
        if self._sp.bos_id() < 0:
            raise TokenizerError(
                f"--tokenizer-model {model_file}: the model has no bos piece, which Llama2Tokenizer "
                "puts before every text (use --tokenizer-type SentencePieceTokenizer)"
            )

    def tokenize(self, text: str) -> list[int]:
        return [self._sp.bos_id()] + super().tokenize(text)


# --------------------------------------------------------------------------- Hugging Face library


class _HFLibraryTokenizer(Tokenizer):
    """Shared encode/decode over a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer, add_special_tokens: bool) -> None:
        self._tok = tokenizer
        self._add_special_tokens = add_special_tokens
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._token_to_id = vocab
        # Vocabularies may have holes: size the embedding by the largest id.
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=self._add_special_tokens).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=self._add_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def token_id(self, token: str) -> int | None:
        """The id of one whole token string, or None if it is not in the vocabulary."""
        return self._token_to_id.get(token)


class GPT2BPETokenizer(_HFLibraryTokenizer):
    """GPT-2's byte-level BPE from `vocab.json` and `merges.txt`; eod is `<|endoftext|>`.

    Like Megatron-LM's GPT-2 tokenizer, the literal text `<|endoftext|>` inside a document is
    encoded as ordinary text, so a document cannot end itself early.
    """

    type_name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str | None, merge_file: str | None) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        self.vocab_file = _require_file(
            _require_flag(vocab_file, "--vocab-file", self.type_name, "GPT-2 vocab.json"),
            "--vocab-file",
        )
        self.merge_file = _require_file(
            _require_flag(merge_file, "--merge-file", self.type_name, "GPT-2 merges.txt"),
            "--merge-file",
        )
        vocab = _read_vocab_json(self.vocab_file)
        try:
            bpe = models.BPE.from_file(self.vocab_file, self.merge_file)
        except Exception as exc:  # the Rust library raises plain Exception
            raise TokenizerError(
                f"--merge-file {self.merge_file}: not GPT-2 BPE merges for --vocab-file "
                f"{self.vocab_file} ({_first_line(exc)})"
            ) from None
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        super().__init__(tok, add_special_tokens=False)
        if GPT2_EOD_TOKEN not in vocab:
            raise TokenizerError(f"--vocab-file {self.vocab_file}: no {GPT2_EOD_TOKEN} token")
        self._eod = vocab[GPT2_EOD_TOKEN]

    @property
    def eod(self) -> int:
        return self._eod

    def _identity(self) -> dict:
        return {
            "vocab_file": os.path.abspath(self.vocab_file),
            "merge_file": os.path.abspath(self.merge_file),
        }


def _read_vocab_json(path: str) -> dict[str, int]:
    """A GPT-2 vocab.json, checked here because the library's message does not name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"--vocab-file {path}: not a GPT-2 vocab.json ({_first_line(exc)})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"--vocab-file {path}: not a GPT-2 vocab.json (expected {{token: id}})")
    return vocab


class HuggingFaceTokenizer(_HFLibraryTokenizer):
    """A Hugging Face `tokenizer.json` (or a directory holding one), read with `tokenizers`.

    Encoding applies the file's post-processor (for example a leading BOS), as Megatron-LM's
    Hugging Face tokenizer does; decoding drops special tokens. The eod/bos/pad tokens come
    from a `tokenizer_config.json` beside the file when there is one, else from common names.
    """

    type_name = "HuggingFaceTokenizer"

    def __init__(self, path: str | None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = _require_flag(path, "--tokenizer-model", self.type_name, "tokenizer.json or its directory")
        self.tokenizer_file = _tokenizer_json_path(path)
        if not _looks_like_json(self.tokenizer_file):
            raise TokenizerError(
                f"--tokenizer-model {self.tokenizer_file}: not a Hugging Face tokenizer.json "
                "(not JSON; for a SentencePiece .model use --tokenizer-type SentencePieceTokenizer)"
            )
        try:
            tok = HFTokenizer.from_file(self.tokenizer_file)
        except Exception as exc:  # the Rust library raises plain Exception
            raise TokenizerError(
                f"--tokenizer-model {self.tokenizer_file}: not a Hugging Face tokenizer.json ({_first_line(exc)})"
            ) from None
        super().__init__(tok, add_special_tokens=True)
        config = _special_tokens_config(os.path.dirname(self.tokenizer_file))
        eod = self._special_id(config.get("eos_token"), _EOS_CANDIDATES)
        if eod is None:
            raise TokenizerError(
                f"--tokenizer-model {self.tokenizer_file}: no end-of-text token found (looked for "
                f"eos_token in tokenizer_config.json, then {', '.join(_EOS_CANDIDATES)})"
            )
        self._eod = eod
        self._bos = self._special_id(config.get("bos_token"), _BOS_CANDIDATES)
        self._pad = self._special_id(config.get("pad_token"), _PAD_CANDIDATES)

    def _special_id(self, configured: str | None, candidates: Sequence[str]) -> int | None:
        if configured is not None:
            if self.token_id(configured) is None:
                raise TokenizerError(
                    f"--tokenizer-model {self.tokenizer_file}: special token {configured!r} named in "
                    "tokenizer_config.json is not in the vocabulary"
                )
            return self.token_id(configured)
        for name in candidates:
            if self.token_id(name) is not None:
                return self.token_id(name)
        return None

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int | None:
        return self._bos

    @property
    def pad(self) -> int | None:
        return self._pad

    def _identity(self) -> dict:
        return {"tokenizer_model": os.path.abspath(self.tokenizer_file)}


def _tokenizer_json_path(path: str) -> str:
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(candidate):
            raise TokenizerError(f"--tokenizer-model {path}: directory has no tokenizer.json")
        return candidate
    return _require_file(path, "--tokenizer-model")


def _special_tokens_config(directory: str) -> dict[str, str]:
    """eos/bos/pad token strings from tokenizer_config.json or special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"{path}: not valid JSON ({_first_line(exc)})") from None
        for key in ("eos_token", "bos_token", "pad_token"):
            value = data.get(key) if isinstance(data, dict) else None
            if isinstance(value, dict):  # {"content": "</s>", ...}
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


# --------------------------------------------------------------------------- null


class NullTokenizer(Tokenizer):
    """Text is already token ids: whitespace-separated integers below `vocab_size`.

    Used for synthetic data and benchmarks. The last id, `vocab_size - 1`, ends documents.
    """

    type_name = "NullTokenizer"

    def __init__(self, vocab_size: int | None) -> None:
        if vocab_size is None:
            raise TokenizerError(f"--tokenizer-type {self.type_name} needs --vocab-size")
        if int(vocab_size) < 2:
            raise TokenizerError(f"--vocab-size {vocab_size}: must be at least 2 for {self.type_name}")
        self._vocab_size = int(vocab_size)

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            try:
                value = int(word)
            except ValueError:
                raise ValueError(f"{self.type_name}: {word!r} is not an integer token id") from None
            if not 0 <= value < self._vocab_size:
                raise ValueError(
                    f"{self.type_name}: token id {value} is outside [0, {self._vocab_size}) "
                    f"(--vocab-size {self._vocab_size})"
                )
            ids.append(value)
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(i) for i in _as_int_list(ids))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    def _identity(self) -> dict:
        return {"vocab_size": self._vocab_size}


# --------------------------------------------------------------------------- factory and training

TOKENIZER_TYPES = (
    SentencePieceTokenizer.type_name,
    Llama2Tokenizer.type_name,
    GPT2BPETokenizer.type_name,
    HuggingFaceTokenizer.type_name,
    NullTokenizer.type_name,
)


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
) -> Tokenizer:
    """The tokenizer that `--tokenizer-type` and its file flags describe."""
    if tokenizer_type == SentencePieceTokenizer.type_name:
        model = _require_flag(tokenizer_model, "--tokenizer-model", tokenizer_type, "a SentencePiece .model file")
        return SentencePieceTokenizer(model)
    if tokenizer_type == Llama2Tokenizer.type_name:
        model = _require_flag(tokenizer_model, "--tokenizer-model", tokenizer_type, "Llama 2's tokenizer.model")
        return Llama2Tokenizer(model)
    if tokenizer_type == GPT2BPETokenizer.type_name:
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == HuggingFaceTokenizer.type_name:
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == NullTokenizer.type_name:
        return NullTokenizer(vocab_size)
    raise TokenizerError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of: {', '.join(TOKENIZER_TYPES)}"
    )


# Ids fixed by train_sentencepiece, so that every model it makes has pad, bos and eos.
SP_UNK_ID, SP_BOS_ID, SP_EOS_ID, SP_PAD_ID = 0, 1, 2, 3
_SP_SPECIAL_PIECES = 4
_SP_BYTE_PIECES = 256


def train_sentencepiece(
    input_text_file: str,
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_sentences: int = 1_000_000,
    num_threads: int | None = None,
    verbose: bool = False,
) -> str:
    """Train a SentencePiece model on a text file (one sentence or paragraph per line).

    The model keeps text exactly: no normalization, whitespace preserved, and with
    `byte_fallback` any character unseen in training is encoded as its UTF-8 bytes, so
    `detokenize(tokenize(text)) == text`. Ids 0-3 are unk, bos, eos (the end of a document)
    and pad. At most `max_sentences` lines are sampled, which keeps training a few seconds
    on a few MB. `vocab_size` is an upper bound: a text with fewer distinct pieces gives a
    smaller vocabulary instead of failing. Returns the path of the `.model` file.
    """
    import sentencepiece

    _require_file(input_text_file, "input_text_file")
    if os.path.getsize(input_text_file) == 0:
        raise TokenizerError(f"input_text_file {input_text_file}: the file is empty")
    smallest = _SP_SPECIAL_PIECES + (_SP_BYTE_PIECES if byte_fallback else 0) + 1
    if vocab_size < smallest:
        raise TokenizerError(
            f"vocab_size {vocab_size}: too small, needs at least {smallest} "
            f"({_SP_SPECIAL_PIECES} special pieces{' + 256 byte pieces' if byte_fallback else ''} + 1)"
        )
    directory = os.path.dirname(os.path.abspath(model_prefix))
    if not os.path.isdir(directory):
        raise TokenizerError(f"model_prefix {model_prefix}: directory {directory} does not exist")
    try:
        sentencepiece.SentencePieceTrainer.train(
            input=input_text_file,
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=0.9995 if byte_fallback else 1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=SP_UNK_ID,
            bos_id=SP_BOS_ID,
            eos_id=SP_EOS_ID,
            pad_id=SP_PAD_ID,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=16384,
            hard_vocab_limit=False,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as exc:
        raise TokenizerError(f"training SentencePiece on {input_text_file} failed: {_first_line(exc)}") from None
    return model_prefix + ".model"
