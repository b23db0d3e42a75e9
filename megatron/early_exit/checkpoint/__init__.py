"""Checkpoints with megatron-core dist_checkpointing (torch_dist format), without the training code.

Layout under a checkpoint root (`--save DIR`, `--load DIR`):
    DIR/iter_0000100/                       one complete checkpoint (sharded tensors + common.pt)
    DIR/iter_0000100/checksums.json         size and CRC-32 of each of its files, written after them
                                            (older checkpoints lack it)
    DIR/latest_checkpointed_iteration.txt   the latest complete one, written last, by rename
    DIR/.lock                               held (flock) by the run that writes to DIR

Tensor keys use global layer numbers (one key per layer, exits keyed by their layer), so a
checkpoint loads into any TP/PP/DP layout and into a model that keeps only the first layers.

Modules (each imports only those above it):
    errors.py         CheckpointError and how a failure becomes one line
    checksums.py      the CRC-32 manifest: written after the files, checked before a load
    safe_pickle.py    the checkpoint's pickles read through allow-lists (no code in a checkpoint runs)
    reader.py         find, verify, read the model description and the weights
    compatibility.py  whether a checkpoint's weights fit the model the flags build
    writer.py         write weights and the model description, published atomically
    lock.py           one writing run per checkpoint root

The training state (optimizer, scheduler, RNG, iteration) stands on these in
training/checkpointing.py.
"""
