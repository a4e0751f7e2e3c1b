"""Batches: examples bucketed by length, or packed into rows without cross-example attention.

A packed row holds several examples end to end, up to `max_length` tokens. Each example's
position ids restart at 0; that is what keeps examples apart: the trainer's attention
(varlen.py) runs each example on its own, and flash attention on CUDA reads them as
variable-length sequences (plain transformers SDPA would build a block-diagonal mask).
`segments` names the example each token belongs to (-1 for padding), so losses can be read
per example.

The order of batches is a pure function of (seed, epoch), which is what lets a run resume
from (epoch, batch index) mid-epoch.
"""
from __future__ import annotations

import random
from typing import Any

from stages.train.format import IGNORE, Encoded


def length_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar-length examples, in random order (lengths sorted, then chunked)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


EVAL_BATCH_TOKENS = 2048  # padded tokens per scoring batch (budget_batches)


def budget_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Index batches for scoring: examples in length order, each batch as many as fit `budget` padded tokens (its
    rows times its longest; a longer example alone). A fixed row count makes short rows tiny matmuls and long ones
    a large batch: the memory a batch takes follows its tokens, not its rows. bench/eval.py: 1.14x over 8 rows a
    batch on its perplexity pass (AMX Xeon, bf16)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batches and (len(batches[-1]) + 1) * lengths[i] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch (1-based), the same every time they are asked for."""
    return length_batches(lengths, batch_size, random.Random(f"{seed}:{epoch}"))


class BatchStream:
    """Micro-batches forever, epoch after epoch, with a position that a checkpoint can store.

    With `world` > 1 processes, each global batch of batch_size*world examples is dealt out:
    process `rank` takes every world-th example of it.
    """

    def __init__(self, examples: list[Encoded], batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 epoch: int = 1, index: int = 0):
        self.examples, self.seed, self.rank, self.world = examples, seed, rank, world
        self.global_batch = batch_size * world
        self.lengths = [len(e.input_ids) for e in examples]
        self.epoch, self.index = epoch, index
        self._batches = epoch_batches(self.lengths, self.global_batch, seed, epoch)

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def next(self) -> tuple[int, list[Encoded], list[Encoded]]:
        """(epoch, this process's examples, the whole global batch)."""
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = epoch_batches(self.lengths, self.global_batch, self.seed, self.epoch)
        batch = [self.examples[i] for i in self._batches[self.index]]
        self.index += 1
        return self.epoch, batch[self.rank::self.world], batch


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped into rows of at most `max_length` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return rows


def collate(batch: list[Encoded], pad_id: int, device: str) -> dict[str, Any]:
    """One example per row, right-padded to the longest (2D attention mask)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


SHARED_PREFIX_MIN = 8  # tokens a padded batch's rows must share for them to run once (torch_backend.shared_start)


def shared_prefix(batch: list[Encoded]) -> int:
    """How many leading tokens every example of `batch` shares and none trains on, short of the position before the
    first trained token (its hidden state predicts that token): 0 below SHARED_PREFIX_MIN or for a lone example."""
    if len(batch) < 2:
        return 0
    first = batch[0].input_ids
    n = min(next((p for p, label in enumerate(e.labels) if label != IGNORE), len(e.labels)) - 1 for e in batch)
    for e in batch[1:]:
        n = min(n, len(e.input_ids) - 1)
        n = next((p for p in range(n) if e.input_ids[p] != first[p]), n)
    return n if n >= SHARED_PREFIX_MIN else 0


def collate_packed(batch: list[Encoded], pad_id: int, device: str, max_length: int) -> dict[str, Any]:
    """Examples packed into rows of up to `max_length` tokens; `segments[r, t]` = index into `batch`.

    Rows share the width of the fullest one (columns no row uses would be pure padding). Padding
    at a row's end gets its own restarting positions, so it forms a segment of its own.
    """
    import torch

    rows = pack_rows([len(e.input_ids) for e in batch], max_length)
    width = max(sum(len(batch[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e, n = batch[i], len(batch[i].input_ids)
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at:at + n] = torch.tensor(e.labels)
            labels[r, at] = IGNORE  # never a target: unpacked, nothing precedes an example's first token
            positions[r, at:at + n] = torch.arange(n)
            segments[r, at:at + n] = i
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids.to(device), "position_ids": positions.to(device), "labels": labels.to(device),
            "segments": segments.to(device)}
