"""The checkpoint's manifest: size and CRC-32 of every file, written after the files and
checked before a load, so a damaged or truncated checkpoint is named instead of loaded.

    DIR/iter_0000100/checksums.json   {"format": "crc32", "files": {name: [size, crc32 hex]}}

Checkpoints written before the manifest have none; their checks are skipped.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Dict, List, Optional, Tuple

import torch

from megatron.early_exit.checkpoint.errors import CheckpointError

MANIFEST = "checksums.json"


def file_checksum(path: str, chunk: int = 16 << 20) -> str:
    """CRC-32 of a file (zlib's, about 3.5 GB/s on one core), as 8 hex digits."""
    crc, buffer = 0, bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                return f"{crc:08x}"
            crc = zlib.crc32(view[:n], crc)


def read_manifest(path: str) -> Optional[Dict[str, list]]:
    """{file name: [size, crc32]} of the checkpoint at `path`; None if it has no manifest."""
    source = os.path.join(path, MANIFEST)
    if not os.path.isfile(source):
        return None
    try:
        manifest = json.load(open(source))
        files = manifest["files"]
        if manifest.get("format") != "crc32" or not all(isinstance(v, list) and len(v) == 2 for v in files.values()):
            raise ValueError("unknown layout")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint file {source} is corrupt ({type(err).__name__})") from err
    return files


def _describe(path: str, name: str) -> str:
    kind = "shard" if name.endswith(".distcp") else "file"
    return f"checkpoint {kind} {os.path.join(path, name)}"


def split_by_size(files: Dict[str, list], parts: int) -> List[List[str]]:
    """File names in `parts` groups of about equal bytes (the same on every rank)."""
    groups, loads = [[] for _ in range(parts)], [0] * parts
    for name in sorted(files, key=lambda n: (-files[n][0], n)):
        least = loads.index(min(loads))
        groups[least].append(name)
        loads[least] += files[name][0]
    return groups


def checksum_problems(path: str, part: Tuple[int, int] = (0, 1), with_crc: bool = True) -> List[str]:
    """What is wrong with the files the manifest names (every size; the CRC-32 of this
    part's share, `part` = (index, number of parts)); [] when nothing or no manifest."""
    files = read_manifest(path)
    if files is None:
        return []
    problems = []
    for name, (size, _) in sorted(files.items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            problems.append(f"{_describe(path, name)} is missing")
        elif os.path.getsize(full) != size:
            have = os.path.getsize(full)
            problems.append(
                f"{_describe(path, name)} is truncated ({have} bytes, {size} written)"
                if have < size
                else f"{_describe(path, name)}: {have} bytes, {size} written (damaged)"
            )
    if problems or not with_crc:
        return problems
    for name in split_by_size(files, part[1])[part[0]]:
        if file_checksum(os.path.join(path, name)) != files[name][1]:
            problems.append(f"{_describe(path, name)}: checksum mismatch (damaged)")
    return problems


def verify_on_all_ranks(path: str) -> None:
    """The checksums of the checkpoint at `path`, each rank reading its share of the
    files; every rank raises the same error."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    every = [None] * world
    torch.distributed.all_gather_object(every, checksum_problems(path, (rank, world)))
    problems = sorted({problem for part in every for problem in part})
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)


def write_manifest(tmp: str) -> None:
    """checksums.json in `tmp`: each rank sums the shard files it wrote (`__RANK_N.distcp`),
    rank 0 the others; rank 0 writes the manifest, last, before the rename publishes it."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    names = sorted(n for n in os.listdir(tmp) if n != MANIFEST)
    mine = [n for n in names if _writer_of(n, world) == rank]
    sums = {n: [os.path.getsize(os.path.join(tmp, n)), file_checksum(os.path.join(tmp, n))] for n in mine}
    every = [None] * world
    torch.distributed.all_gather_object(every, sums)
    if rank == 0:
        files = {name: entry for part in every for name, entry in part.items()}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"format": "crc32", "files": dict(sorted(files.items()))}, f, indent=0)
            f.flush()
            os.fsync(f.fileno())


def _writer_of(name: str, world: int) -> int:
    shard = re.match(r"__(\d+)_\d+\.distcp$", name)
    return int(shard.group(1)) % world if shard else 0
