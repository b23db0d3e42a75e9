"""Training data: megatron-core's GPT datasets and a Megatron-style pretraining sampler.

Datasets are built by megatron-core's BlendedMegatronDatasetBuilder (one path, a
weighted blend, or mock data), split train/valid/test by `--split`. The sampler
walks the global batch in order and gives each data-parallel rank its slice of
every microbatch, so a run's data order depends only on the global batch, not on
the layout: DP=2 sees the same samples per step as one process.
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import torch

from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

from megatron.early_exit.pipeline.plan import default_num_fill_microbatches


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


def dataset_config(args, tokenizer) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=None if args.mock_data else get_blend_from_list(args.data_path),
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=_DatasetTokenizer(tokenizer),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.reset_attention_mask,
        mid_level_dataset_surplus=0.005,
    )


def num_fill_samples_per_iteration(args) -> int:
    """Most samples the bubble-filling microbatches of one iteration can read."""
    if not args.fill_explicit_bubbles:
        return 0
    default = default_num_fill_microbatches(args.pipeline_model_parallel_size, args.backward_forward_ratio)
    warmup = default if args.num_fill_warmup_microbatches is None else args.num_fill_warmup_microbatches
    cooldown = default if args.num_fill_cooldown_microbatches is None else args.num_fill_cooldown_microbatches
    return (warmup + cooldown) * args.micro_batch_size * args.data_parallel_size


def build_datasets(args, tokenizer):
    """(train, valid, test) datasets sized for the whole run; None where a split is empty."""
    eval_runs = args.train_iters // args.eval_interval + 1 if args.eval_iters > 0 else 0
    sizes = [
        args.train_iters * (args.global_batch_size + num_fill_samples_per_iteration(args)),
        eval_runs * args.eval_iters * args.global_batch_size,
        args.eval_iters * args.global_batch_size,
    ]
    cls = MockGPTDataset if args.mock_data else GPTDataset
    # Every rank builds (indices are cached on disk by the first); cheap at our sizes.
    builder = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, dataset_config(args, tokenizer))
    return builder.build()


def build_data_iterator(dataset, args, consumed_samples: int = 0, cyclic: bool = False,
                        pin_memory: bool = False) -> Optional[Iterator[dict]]:
    """Microbatches of this data-parallel rank; `pin_memory` (for a CUDA device) lets the
    step copy them to the device without waiting."""
    if dataset is None:
        return None
    sampler = PretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=args.micro_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )
    # Its own generator: creating an iterator must not draw from the global RNG, or a
    # resumed run (which builds iterators after restoring the RNG) would diverge.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0, generator=torch.Generator(),
                                         pin_memory=pin_memory)
    if not cyclic:
        return iter(loader)

    def forever():
        while True:
            yield from loader

    return forever()
