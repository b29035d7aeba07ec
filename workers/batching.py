"""The batching policy, pure: which sequences run together. No I/O, no model; unit-tested on its own."""

from __future__ import annotations


def unique_sequences(seqs: list[tuple]) -> tuple[list[tuple], list[int]]:
    """Identical token sequences in a batch are computed once: (unique ones, index into them per input)."""
    first: dict[tuple, int] = {}
    index = []
    for s in seqs:
        index.append(first.setdefault(s, len(first)))
    return list(first), index


def split_by_tokens(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Consecutive groups of sequence indices, each at most `max_batch_tokens` long in total.
    A single sequence longer than the budget gets a group of its own (it must run somewhere)."""
    groups, cur, cur_tokens = [], [], 0
    for i, n in enumerate(lengths):
        if cur and cur_tokens + n > max_batch_tokens:
            groups.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += n
    if cur:
        groups.append(cur)
    return groups
