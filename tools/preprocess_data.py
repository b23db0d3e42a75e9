"""Tokenize a JSON-lines corpus into Megatron's indexed dataset files.

Each line of `--input` is a JSON object; the text under each of `--json-keys` becomes one
document of `{output_prefix}_{key}_document.bin/.idx`, written with megatron-core's
`IndexedDatasetBuilder` so that megatron-core's `IndexedDataset` and GPT datasets read it.
The flags are Megatron-LM's (tools/preprocess_data.py), so its launch scripts work unchanged:

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \\
        --append-eod --workers 2

Progress and throughput go to stderr; a summary goes to stdout at the end. Outputs are written
under temporary names (`{output}.tmp{PID}.bin/.idx`) and renamed only when the whole corpus
succeeded, so a failed run (bad line, empty corpus, Ctrl-C, kill) leaves no partial dataset that
training could pick up. A run killed outright (SIGKILL) leaves its temporary files;
the next run on the same output prefix removes those whose process is gone.
Blank lines and documents whose text tokenizes to nothing are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# megatron-core announces its fallbacks for missing GPU libraries on import; not news here.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")

import numpy  # noqa: E402

import megatron.early_exit  # noqa: E402,F401  (CPU adapter for megatron-core)

# isort: split
from megatron.early_exit.errors import ConfigError, EarlyExitError  # noqa: E402
from megatron.early_exit.tokenizers import Tokenizer, build_tokenizer  # noqa: E402

LEVEL = "document"
CHUNK_SIZE = 64  # lines per task handed to a worker: amortizes inter-process overhead


class PreprocessError(ConfigError):
    """The input corpus or the output location is unusable."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="JSON-lines file, one JSON object per line")
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="keys of the text to tokenize; each gets its own output (default: text)",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        required=True,
        help="SentencePieceTokenizer, GPT2BPETokenizer, HuggingFaceTokenizer or NullTokenizer",
    )
    group.add_argument(
        "--tokenizer-model",
        default=None,
        help="SentencePiece .model, or Hugging Face tokenizer.json (or its directory)",
    )
    group.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    group.add_argument("--vocab-size", type=int, default=None, help="vocabulary size of NullTokenizer")
    group.add_argument("--append-eod", action="store_true", help="end every document with the eod id")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin and .idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")
    group.add_argument(
        "--log-interval", type=int, default=100, help="report progress every this many documents (default: 100)"
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags before any work or any file is created."""
    if not os.path.exists(args.input):
        raise PreprocessError(f"--input {args.input}: no such file")
    if not os.path.isfile(args.input):
        raise PreprocessError(f"--input {args.input}: not a file")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise PreprocessError(f"--json-keys {' '.join(args.json_keys)}: a key is repeated")
    directory = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(directory):
        raise PreprocessError(f"--output-prefix {args.output_prefix}: directory {directory} does not exist")
    if args.workers < 1:
        raise PreprocessError(f"--workers {args.workers}: must be at least 1")
    if args.log_interval < 1:
        raise PreprocessError(f"--log-interval {args.log_interval}: must be at least 1")


def output_prefix(prefix: str, key: str) -> str:
    """Megatron-LM's naming, which training's --data-path refers to."""
    return f"{prefix}_{key}_{LEVEL}"


def build_from_args(args: argparse.Namespace) -> Tokenizer:
    return build_tokenizer(
        args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        vocab_size=args.vocab_size,
    )


def token_dtype(tokenizer: Tokenizer) -> type[numpy.number]:
    """The smallest dtype holding every id, as Megatron-LM chooses it."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(tokenizer.vocab_size)


# ----------------------------------------------------------------------------- workers


@dataclass
class Encoded:
    """One input line: its number, its size, and per key the token ids (or an error)."""

    line_number: int
    num_bytes: int
    documents: dict[str, numpy.ndarray] | None = None  # None for a blank line
    error: str | None = None


class Encoder:
    """Turns one JSON line into token ids; built once per worker process."""

    def __init__(self, args: argparse.Namespace, tokenizer: Tokenizer | None = None) -> None:
        self.tokenizer = tokenizer or build_from_args(args)
        self.json_keys = list(args.json_keys)
        self.append_eod = args.append_eod
        self.dtype = token_dtype(self.tokenizer)

    def encode(self, item: tuple[int, bytes]) -> Encoded:
        line_number, line = item
        result = Encoded(line_number, len(line))
        if not line.strip():
            return result
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            result.error = f"not valid JSON ({exc})"
            return result
        if not isinstance(record, dict):
            result.error = f"expected a JSON object, got {type(record).__name__}"
            return result
        result.documents = {}
        for key in self.json_keys:
            ids, error = self._encode_text(record, key)
            if error:
                result.error = error
                return result
            result.documents[key] = ids
        return result

    def _encode_text(self, record: dict, key: str) -> tuple[numpy.ndarray | None, str | None]:
        if key not in record:
            return None, f"no key {key!r} (--json-keys {' '.join(self.json_keys)})"
        text = record[key]
        if not isinstance(text, str):
            return None, f"{key!r} is a {type(text).__name__}, expected a string"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\ud800") is valid JSON but not text
            return None, f"{key!r}: not valid Unicode ({exc.reason}: {text[exc.start]!r} at character {exc.start})"
        try:
            ids = self.tokenizer.tokenize(text)
        except ValueError as exc:
            return None, f"{key!r}: {exc}"
        except (RuntimeError, TypeError) as exc:  # raised from a tokenizer's native code
            return None, f"{key!r}: the tokenizer failed ({type(exc).__name__}: {_first_line(exc)})"
        if ids and self.append_eod:
            ids.append(self.tokenizer.eod)
        return numpy.asarray(ids, dtype=self.dtype), None


_WORKER_ENCODER: Encoder | None = None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _init_worker(args: argparse.Namespace) -> None:
    global _WORKER_ENCODER
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the main process cleans up; a worker just ends
    _WORKER_ENCODER = Encoder(args)


def _encode_in_worker(item: tuple[int, bytes]) -> Encoded:
    return _WORKER_ENCODER.encode(item)


# ----------------------------------------------------------------------------- output


def temporary_prefix(final: str, pid: int) -> str:
    return f"{final}.tmp{pid}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_leftovers(prefix: str, keys: list[str]) -> list[str]:
    """Delete the temporary files of earlier runs on this output prefix that were killed
    (their process is gone); a live run's files are left alone. Returns the removed paths."""
    removed = []
    for key in keys:
        final = output_prefix(prefix, key)
        directory, name = os.path.split(os.path.abspath(final))
        pattern = re.compile(re.escape(name) + r"\.tmp([0-9]+)\.(bin|idx)")
        for entry in os.listdir(directory):
            found = pattern.fullmatch(entry)
            if found and int(found.group(1)) != os.getpid() and not _pid_alive(int(found.group(1))):
                os.remove(os.path.join(directory, entry))
                removed.append(os.path.join(directory, entry))
    return removed


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outputs:
    """One IndexedDatasetBuilder per key, on temporary paths until `commit`."""

    def __init__(self, prefix: str, keys: list[str], dtype: type[numpy.number]) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.final = {key: output_prefix(prefix, key) for key in keys}
        self.temp = {key: temporary_prefix(path, os.getpid()) for key, path in self.final.items()}
        self.builders = {}
        try:
            for key in keys:
                self.builders[key] = IndexedDatasetBuilder(self.temp[key] + ".bin", dtype=dtype)
        except BaseException:
            self.discard()
            raise

    def add(self, key: str, ids: numpy.ndarray) -> None:
        self.builders[key].add_document(ids, [ids.size])

    def commit(self) -> None:
        """Write the indexes to disk, then publish each key: remove its old .idx, rename the .bin,
        then the .idx. Training opens a prefix by its .idx, so an interruption at any point leaves
        the old pair, no .idx (the prefix is absent), or the new pair, never a mix."""
        for key, builder in self.builders.items():
            builder.finalize(self.temp[key] + ".idx")
            for suffix in (".bin", ".idx"):
                _fsync(self.temp[key] + suffix)
        for key in self.builders:
            if os.path.exists(self.final[key] + ".idx"):
                os.remove(self.final[key] + ".idx")
            os.replace(self.temp[key] + ".bin", self.final[key] + ".bin")
            os.replace(self.temp[key] + ".idx", self.final[key] + ".idx")
        _fsync(os.path.dirname(os.path.abspath(next(iter(self.final.values())))))

    def discard(self) -> None:
        for key, builder in self.builders.items():
            builder.data_file.close()
        for path in self.temp.values():
            for suffix in (".bin", ".idx"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)


# ----------------------------------------------------------------------------- progress


@dataclass
class Stats:
    """Counts for the progress lines and the summary."""

    start: float = field(default_factory=time.perf_counter)
    lines: int = 0
    documents: int = 0
    blank_lines: int = 0
    num_bytes: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    empty: dict[str, int] = field(default_factory=dict)

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def rates(self) -> str:
        seconds = self.elapsed()
        return (
            f"{self.documents / seconds:,.0f} docs/s, {self.num_bytes / seconds / 1e6:.2f} MB/s, "
            f"{sum(self.tokens.values()) / seconds:,.0f} tokens/s"
        )

    def progress_line(self) -> str:
        return (
            f"processed {self.documents:,} documents, {sum(self.tokens.values()):,} tokens, "
            f"{self.num_bytes / 1e6:.1f} MB ({self.rates()})"
        )


def summary(stats: Stats, args: argparse.Namespace, dtype: type[numpy.number]) -> str:
    lines = [
        f"done: {stats.documents:,} documents, {sum(stats.tokens.values()):,} tokens, "
        f"{stats.num_bytes / 1e6:.1f} MB of input in {stats.elapsed():.1f} s ({stats.rates()})"
    ]
    for key in args.json_keys:
        skipped = f", {stats.empty[key]:,} empty skipped" if stats.empty[key] else ""
        lines.append(
            f"  {key}: {stats.kept[key]:,} documents, {stats.tokens[key]:,} tokens{skipped} -> "
            f"{output_prefix(args.output_prefix, key)}.bin/.idx ({numpy.dtype(dtype).name})"
        )
    if stats.blank_lines:
        lines.append(f"  {stats.blank_lines:,} blank lines skipped")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main loop


def encoded_lines(args: argparse.Namespace, tokenizer: Tokenizer, stream) -> Iterator[Encoded]:
    """Encoded lines in input order, from a worker pool or from this process."""
    items = enumerate(stream, start=1)
    if args.workers == 1:
        encoder = Encoder(args, tokenizer)
        yield from map(encoder.encode, items)
        return
    with multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=(args,)) as pool:
        yield from pool.imap(_encode_in_worker, items, CHUNK_SIZE)


def consume(args: argparse.Namespace, tokenizer: Tokenizer, outputs: Outputs, stats: Stats) -> None:
    # closing(): on an error the worker pool stops now, not when the traceback is freed.
    with open(args.input, "rb") as stream, closing(encoded_lines(args, tokenizer, stream)) as results:
        for encoded in results:
            stats.lines += 1
            stats.num_bytes += encoded.num_bytes
            if encoded.error:
                raise PreprocessError(f"--input {args.input}, line {encoded.line_number}: {encoded.error}")
            if encoded.documents is None:
                stats.blank_lines += 1
                continue
            stats.documents += 1
            for key, ids in encoded.documents.items():
                if ids.size == 0:
                    stats.empty[key] += 1
                    continue
                outputs.add(key, ids)
                stats.kept[key] += 1
                stats.tokens[key] += int(ids.size)
            if stats.documents % args.log_interval == 0:
                print(stats.progress_line(), file=sys.stderr, flush=True)


def check_not_empty(args: argparse.Namespace, stats: Stats) -> None:
    if stats.documents == 0:
        what = "the file is empty" if stats.lines == 0 else "only blank lines"
        raise PreprocessError(f"--input {args.input}: no documents ({what})")
    for key in args.json_keys:
        if stats.kept[key] == 0:
            raise PreprocessError(f"--input {args.input}: no document has any text under {key!r}")


def run(args: argparse.Namespace) -> Stats:
    """Tokenize the corpus; the outputs appear only if everything succeeded."""
    check_args(args)
    tokenizer = build_from_args(args)  # flags checked here, before any worker starts
    dtype = token_dtype(tokenizer)
    print(
        f"tokenizing {args.input} with {tokenizer} into {args.output_prefix}_*_{LEVEL} using {args.workers} worker(s)",
        file=sys.stderr,
        flush=True,
    )
    stats = Stats(
        tokens=dict.fromkeys(args.json_keys, 0),
        kept=dict.fromkeys(args.json_keys, 0),
        empty=dict.fromkeys(args.json_keys, 0),
    )
    for path in remove_leftovers(args.output_prefix, args.json_keys):
        print(f"removed {path}, left by an interrupted run", file=sys.stderr, flush=True)
    outputs = Outputs(args.output_prefix, args.json_keys, dtype)
    try:
        consume(args, tokenizer, outputs, stats)
        check_not_empty(args, stats)
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    print(summary(stats, args, dtype), flush=True)
    return stats


def _terminate(signum, frame):
    raise KeyboardInterrupt  # so that `run` discards its temporary files on a plain `kill`


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        run(args)
    except EarlyExitError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
