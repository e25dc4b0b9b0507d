"""Near-duplicate detection with MinHash signatures and locality-sensitive hashing."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective, well-mixing hash of uint64 values."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def shingles(text: str, n: int = 3) -> set[int]:
    """64-bit hashes of the word ``n``-grams of ``text`` (the whole text when it is shorter)."""
    words = text.split()
    grams = [" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))]
    return {
        int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams
    }


class MinHasher:
    """MinHash signatures: ``num_perm`` hash functions ``splitmix64(x ^ key_i)``, keys fixed
    by ``seed``."""

    def __init__(self, num_perm: int = 64, seed: int = 0):
        if num_perm <= 0:
            raise ValueError(f"num_perm: expected a positive int, got {num_perm}")
        rng = np.random.default_rng(seed)
        self._keys = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64)
        self.num_perm = num_perm

    def signature(self, hashes: set[int]) -> np.ndarray:
        if not hashes:
            raise ValueError("hashes: expected at least one shingle hash")
        values = np.fromiter(hashes, dtype=np.uint64, count=len(hashes))
        return _splitmix64(values[:, None] ^ self._keys[None, :]).min(axis=0)


def near_duplicate_clusters(
    texts: Sequence[str],
    threshold: float = 0.8,
    num_perm: int = 64,
    bands: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> list[int]:
    """For each text, the index of its cluster's representative (the lowest index in it).

    Two texts join a cluster when their estimated Jaccard similarity of word 3-gram
    shingles is at least ``threshold``; LSH with ``bands`` bands proposes the candidates."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold: expected a value in (0, 1], got {threshold}")
    if num_perm % bands:
        raise ValueError(f"bands: must divide num_perm={num_perm}, got {bands}")
    hasher = MinHasher(num_perm, seed)
    signatures = (
        np.stack(
            [
                hasher.signature(shingles(t))
                for t in tqdm(texts, desc="minhash", unit="text", disable=not progress)
            ]
        )
        if texts
        else None
    )
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows = num_perm // bands
    for band in range(bands):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for i in range(len(texts)):
            buckets[signatures[i, band * rows : (band + 1) * rows].tobytes()].append(i)
        for members in buckets.values():
            leaders: list[int] = []  # greedy leader clustering inside the bucket
            for member in members:
                for leader in leaders:
                    if np.mean(signatures[leader] == signatures[member]) >= threshold:
                        root_a, root_b = find(leader), find(member)
                        parent[max(root_a, root_b)] = min(root_a, root_b)
                        break
                else:
                    leaders.append(member)
    return [find(i) for i in range(len(texts))]
