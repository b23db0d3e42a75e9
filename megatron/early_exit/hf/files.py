"""Files of a Hugging Face model directory: weights read lazily, weights written in
shards, tokenizer files copied, and an output directory that appears only when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from megatron.early_exit.hf.errors import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
EXIT_WEIGHTS = "early_exit_heads.safetensors"
# Tokenizer files carried along in both directions, whichever the model has (transformers 5
# saves the chat template as chat_template.jinja, earlier versions in tokenizer_config.json).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConversionError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None


class HFWeights:
    """Tensors of a Hugging Face checkpoint by name, read one at a time (safetensors,
    sharded or not, or pytorch_model.bin), plus optional extra safetensors files."""

    def __init__(self, directory: str, extra_files: Iterable[str] = ()):
        self.directory = directory
        self._where: Dict[str, str] = {}  # tensor name -> file
        self._open: Dict[str, object] = {}
        files = self._read_index() or [self._single_file()]
        for name in extra_files:
            if not os.path.isfile(os.path.join(directory, name)):
                raise ConversionError(
                    f"{os.path.join(directory, name)} is missing (named by config.json's early_exit section)"
                )
            files.append(name)
        for file in files:
            for key in self._handle(file).keys():
                self._where[key] = file

    def _read_index(self) -> List[str]:
        """Shards named by an index file (their tensors are listed as they are opened)."""
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index_path = os.path.join(self.directory, index_name)
            if not os.path.isfile(index_path):
                continue
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_path}: no weight_map")
            files = sorted(set(weight_map.values()))
            for file in files:
                if not os.path.isfile(os.path.join(self.directory, file)):
                    raise ConversionError(f"{os.path.join(self.directory, file)} is missing (named by {index_name})")
            return files
        return []

    def _single_file(self) -> str:
        for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
            if os.path.isfile(os.path.join(self.directory, single)):
                return single
        raise ConversionError(
            f"{self.directory}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
            f"{BIN_SINGLE} or {BIN_INDEX})"
        )

    def _handle(self, file: str):
        if file not in self._open:
            path = os.path.join(self.directory, file)
            try:
                if file.endswith(".safetensors"):
                    from safetensors import safe_open

                    self._open[file] = safe_open(path, framework="pt", device="cpu")
                else:  # memory-mapped: tensors are read when used
                    self._open[file] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise ConversionError(f"{path}: cannot be read ({type(exc).__name__}: {first})") from None
        return self._open[file]

    def keys(self) -> List[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> Tuple[int, ...]:
        """A tensor's shape, from the file's header (its data is not read)."""
        file = self._where[name]
        handle = self._handle(file)
        return tuple(handle.get_slice(name).get_shape()) if file.endswith(".safetensors") else tuple(handle[name].shape)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConversionError(f"{self.directory}: tensor {name} is missing from the checkpoint")
        file = self._where[name]
        handle = self._handle(file)
        return handle.get_tensor(name) if file.endswith(".safetensors") else handle[name]


def plan_shards(sizes: List[Tuple[str, int]], max_shard_bytes: int) -> List[List[str]]:
    """Group items (name, bytes), in order, into shards of at most `max_shard_bytes`
    (an item larger than that gets a shard of its own)."""
    shards: List[List[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return [s for s in shards if s]


class ShardWriter:
    """Writes shard i of n when its tensors are complete, then the index; one shard in memory."""

    def __init__(self, directory: str, num_shards: int, basename: str = "model"):
        self.directory, self.num_shards, self.basename = directory, num_shards, basename
        self.weight_map: Dict[str, str] = {}
        self.total_size = 0

    def file_name(self, index: int) -> str:
        if self.num_shards == 1:
            return f"{self.basename}.safetensors"
        return f"{self.basename}-{index + 1:05d}-of-{self.num_shards:05d}.safetensors"

    def write(self, index: int, tensors: Dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        name = self.file_name(index)
        save_file(tensors, os.path.join(self.directory, name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            self.weight_map[key] = name
            self.total_size += tensor.numel() * tensor.element_size()

    def finish(self) -> None:
        if self.num_shards > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            with open(os.path.join(self.directory, f"{self.basename}.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)


def copy_tokenizer_files(source_dir: str, target_dir: str, names: Iterable[str] = TOKENIZER_FILES) -> List[str]:
    """Copy the tokenizer files present in `source_dir`; returns their names."""
    copied = []
    for name in names:
        path = os.path.join(source_dir, name)
        if os.path.isfile(path):
            os.makedirs(target_dir, exist_ok=True)
            shutil.copy2(path, os.path.join(target_dir, name))
            copied.append(name)
    return copied


def require_new_output(path: str) -> None:
    final = os.path.abspath(path)
    if os.path.exists(final) and (not os.path.isdir(final) or os.listdir(final)):
        raise ConversionError(f"output {path} already exists and is not empty (choose a new directory)")


@contextmanager
def atomic_output_dir(path: str) -> Iterator[str]:
    """Yield a temporary directory beside `path` that becomes `path` only if the block
    finishes; on any error it is removed, so nothing half-written is left."""
    final = os.path.abspath(path)
    require_new_output(path)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(final):
        os.rmdir(final)  # empty (checked above)
    os.replace(tmp, final)


def tokenizer_source_dir(tokenizer_type: Optional[str], tokenizer_model: Optional[str]) -> Optional[str]:
    """The directory holding a checkpoint's tokenizer files, for Hugging Face and
    SentencePiece tokenizers (a file path or its directory)."""
    if not tokenizer_model or tokenizer_type not in ("HuggingFaceTokenizer", "SentencePieceTokenizer"):
        return None
    return tokenizer_model if os.path.isdir(tokenizer_model) else os.path.dirname(tokenizer_model)
