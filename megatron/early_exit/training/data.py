"""Training data: megatron-core's GPT datasets and a Megatron-style pretraining sampler.

Datasets are built by megatron-core's BlendedMegatronDatasetBuilder (one path, a
weighted blend, or mock data), split train/valid/test by `--split`. Before megatron-core
opens a dataset, its .idx header and file sizes are checked, and every split the run reads
must get documents: a bad file or split stops the run with one line naming it. The sampler
walks the global batch in order and gives each data-parallel rank its slice of
every microbatch, so a run's data order depends only on the global batch, not on
the layout: DP=2 sees the same samples per step as one process.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Iterator, List, Optional

import numpy
import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import DType
from megatron.core.datasets.utils import get_blend_from_list

from megatron.early_exit.errors import ConfigError

if TYPE_CHECKING:
    from megatron.early_exit.training.run_config import DataConfig, RunConfig


class PretrainingSampler:
    """Yields this DP rank's indices of each microbatch, starting after `consumed_samples`.

    Microbatch k of a step covers samples [k*mbs*dp, (k+1)*mbs*dp) of the step's global
    batch; rank r takes the r-th slice of mbs samples (as Megatron-LM's sampler does).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self):
        return self.total_samples

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.dp_size
        start = self.dp_rank * self.micro_batch_size
        for first in range(self.consumed_samples, self.total_samples - step + 1, step):
            yield list(range(first + start, first + start + self.micro_batch_size))


class _DatasetTokenizer:
    """The tokenizer as megatron-core's datasets read it. They take `pad` when reading it
    works and their own out-of-vocabulary pad id otherwise, so a tokenizer without a pad
    token must raise rather than answer None."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    @property
    def pad(self):
        if self._tokenizer.pad is None:
            raise AttributeError("pad")
        return self._tokenizer.pad


def dataset_config(data: "DataConfig", seed: int, tokenizer) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data.seq_length,
        blend=None if data.mock_data else get_blend_from_list(list(data.data_path)),
        split=data.split,
        path_to_cache=data.data_cache_path,
        tokenizer=_DatasetTokenizer(tokenizer),
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=data.reset_attention_mask,
        mid_level_dataset_surplus=0.005,
    )


def num_fill_samples_per_iteration(config: "RunConfig", vocab_size: int) -> int:
    """Most samples the bubble-filling microbatches of one iteration can read."""
    if not config.schedule.fill_explicit_bubbles:
        return 0
    from megatron.early_exit.training.bubble_fill import num_fill_items

    per_microbatch = config.training.micro_batch_size * config.parallel.data_parallel_size
    most = config.num_microbatches
    # A batch-size ramp-up runs fewer microbatches early on, which may leave room for more items.
    counts = range(1, most + 1) if config.training.rampup_batch_size else (most,)
    items = max(num_fill_items(config, m, vocab_size) for m in counts)
    return items * per_microbatch


SPLIT_NAMES = ("train", "validation", "test")
_INDEX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count + 1
_INDEX_MAGIC = b"MMIDIDX\x00\x00"


def check_indexed_dataset(prefix: str, vocab_size: Optional[int] = None) -> int:
    """Sequences (documents) of `prefix`.bin/.idx, after checking the index header and that
    both files are as long as the header says: megatron-core would assert, fail on a read or
    read past the end of a truncated file; and, given `vocab_size`, that a sample of its
    documents holds no token id outside the vocabulary (a corpus tokenized with another
    tokenizer would fail in the embedding). Reads a bounded amount, whatever the corpus size."""
    idx, data = prefix + ".idx", prefix + ".bin"
    rebuild = "rebuild it with tools/preprocess_data.py"
    try:
        idx_size, data_size = os.path.getsize(idx), os.path.getsize(data)
        with open(idx, "rb") as f:
            head = f.read(_INDEX_HEADER.size)
            if len(head) < _INDEX_HEADER.size or not head.startswith(_INDEX_MAGIC):
                raise ConfigError(f"--data-path: {idx} is not a Megatron .idx file (bad header; {rebuild})")
            _, version, code, sequences, documents = _INDEX_HEADER.unpack(head)
            if version != 1 or code not in {d.value for d in DType}:
                raise ConfigError(
                    f"--data-path: {idx} has an unknown version {version} or token type {code} ({rebuild})"
                )
            needed = _INDEX_HEADER.size + sequences * 12 + documents * 8  # lengths int32, pointers and documents int64
            if idx_size < needed:
                raise ConfigError(
                    f"--data-path: {idx} is truncated: {idx_size} bytes, its header needs {needed} ({rebuild})"
                )
            if sequences == 0:
                raise ConfigError(f"--data-path: {idx} holds no documents")
            f.seek(_INDEX_HEADER.size + (sequences - 1) * 4)
            (last_length,) = struct.unpack("<i", f.read(4))
            f.seek(_INDEX_HEADER.size + sequences * 4 + (sequences - 1) * 8)
            (last_pointer,) = struct.unpack("<q", f.read(8))
    except OSError as err:
        raise ConfigError(f"--data-path: cannot read {err.filename or idx}: {err.strerror}") from None
    end = last_pointer + last_length * DType.size(DType.dtype_from_code(code))
    if last_length < 0 or last_pointer < 0 or data_size < end:
        raise ConfigError(
            f"--data-path: {data} is truncated or does not match {idx}: {data_size} bytes, the index "
            f"needs {end} ({rebuild})"
        )
    if vocab_size is not None:
        _check_token_ids(prefix, sequences, DType.dtype_from_code(code), vocab_size)
    return sequences


_SAMPLED_DOCUMENTS = 64
_SAMPLED_TOKENS = 1 << 20


def _check_token_ids(prefix: str, sequences: int, dtype, vocab_size: int) -> None:
    """Refuse a corpus whose sampled documents (evenly spaced, the first and last included,
    at most ~1M tokens) hold an id >= the tokenizer's vocabulary."""
    lengths = numpy.memmap(prefix + ".idx", dtype=numpy.int32, mode="r", offset=_INDEX_HEADER.size, shape=(sequences,))
    pointers = numpy.memmap(
        prefix + ".idx", dtype=numpy.int64, mode="r", offset=_INDEX_HEADER.size + sequences * 4, shape=(sequences,)
    )
    tokens = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r")
    per_document = max(_SAMPLED_TOKENS // _SAMPLED_DOCUMENTS, 1)
    for doc in sorted(set(numpy.linspace(0, sequences - 1, min(sequences, _SAMPLED_DOCUMENTS)).astype(int).tolist())):
        start = int(pointers[doc]) // dtype().itemsize
        ids = tokens[start : start + min(int(lengths[doc]), per_document)]
        if len(ids) and int(ids.max()) >= vocab_size:
            raise ConfigError(
                f"--data-path: {prefix}.bin document {doc} holds token id {int(ids.max())}, outside the "
                f"tokenizer's vocabulary of {vocab_size} (was it tokenized with another tokenizer or "
                "--vocab-size? rebuild it with tools/preprocess_data.py)"
            )


def split_documents(num_documents: int, split_matrix) -> List[int]:
    """Documents of each split, as megatron-core's builder cuts them (by rounding)."""
    return [
        0 if part is None else int(round(part[1] * num_documents)) - int(round(part[0] * num_documents))
        for part in split_matrix
    ]


def _check_splits(split: str, config, used: List[bool], vocab_size: Optional[int]) -> bool:
    """Check every dataset file (check_indexed_dataset) and refuse a used train or validation
    split without documents (megatron-core's GPTDataset would loop forever looking for
    samples in it); whether every test split has documents."""
    test_has_documents = True
    for prefix in config.blend[0]:
        counts = split_documents(check_indexed_dataset(prefix, vocab_size), config.split_matrix)
        empty = [name for name, n, on in zip(SPLIT_NAMES[:2], counts, used) if on and n == 0]
        if empty:
            shown = ", ".join(f"{name} {n}" for name, n in zip(SPLIT_NAMES, counts))
            hint = " or --eval-iters 0" if "train" not in empty else ""
            raise ConfigError(
                f"--split {split}: the {' and '.join(empty)} split of {prefix} gets no documents "
                f"({shown} of {sum(counts)}); give it a larger share{hint}"
            )
        test_has_documents = test_has_documents and counts[2] > 0
    return test_has_documents


def build_datasets(run: "RunConfig", tokenizer, vocab_size: Optional[int] = None):
    """(train, valid, test) datasets sized for the whole run; None for a split the run does
    not read. Validation reads its split when --eval-iters > 0; pretraining never reads the
    test split, which is built (at validation size) only when --eval-iters > 0 and it has
    documents."""
    train_iters, batch, logging, data = run.training.train_iters, run.training.global_batch_size, run.logging, run.data
    eval_runs = train_iters // logging.eval_interval + 1 if logging.eval_iters > 0 else 0
    sizes = [
        train_iters * (batch + num_fill_samples_per_iteration(run, vocab_size or tokenizer.vocab_size)),
        eval_runs * logging.eval_iters * batch,
        logging.eval_iters * batch,
    ]
    config = dataset_config(data, run.training.seed, tokenizer)
    used = [size > 0 for size in sizes]
    if not data.mock_data:  # on every run, whichever splits it reads
        test_has_documents = _check_splits(data.split, config, used, tokenizer.vocab_size)
        used[2] = used[2] and test_has_documents
    # An unread split is not built at all: asking for 0 samples of it could loop forever.
    config.split_matrix = [part if on else None for part, on in zip(config.split_matrix, used)]
    cls = MockGPTDataset if data.mock_data else GPTDataset
    # Every rank builds (indices are cached on disk by the first); cheap at our sizes.
    builder = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config)
    try:
        return builder.build()
    except Exception as err:
        raise _cache_error(data.data_cache_path, config, err) or err


def _cache_error(data_cache_path: Optional[str], config, err: Exception) -> Optional[ConfigError]:
    """A one-line error for an index cache megatron-core could not write (it raises the
    OSError, or its own Exception around it on a distributed run); None for anything else."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__
    if err is None or not err.filename:
        return None
    where = os.path.abspath(str(err.filename))
    reason = f"{err.strerror}: {err.filename}"
    if data_cache_path:
        if (where + os.sep).startswith(os.path.abspath(data_cache_path) + os.sep):
            return ConfigError(f"--data-cache-path {data_cache_path}: cannot write the dataset index cache ({reason})")
        return None
    # Without the flag, megatron-core caches under {prefix}/cache/.
    prefixes = [] if config.blend is None else config.blend[0]
    if any(where.startswith(os.path.abspath(prefix) + os.sep) for prefix in prefixes):
        return ConfigError(
            f"--data-path: cannot write the dataset index cache beside the data ({reason}); "
            "give a writable --data-cache-path"
        )
    return None


def build_data_iterator(
    dataset, micro_batch_size: int, consumed_samples: int = 0, cyclic: bool = False, pin_memory: bool = False
) -> Optional[Iterator[dict]]:
    """Microbatches of this data-parallel rank; `pin_memory` (for a CUDA device) lets the
    step copy them to the device without waiting."""
    if dataset is None:
        return None
    sampler = PretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )
    # Its own generator: creating an iterator must not draw from the global RNG, or a
    # resumed run (which builds iterators after restoring the RNG) would diverge.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=0, generator=torch.Generator(), pin_memory=pin_memory
    )
    if not cyclic:
        return iter(loader)

    def forever():
        while True:
            yield from loader

    return forever()
