"""Prompt-prefix reuse: keys and values of computed token blocks, found again by their exact token prefix.

A prompt is cut into blocks of ``block_size`` tokens. Block *i*'s key is a hash of block *i-1*'s key and
block *i*'s tokens, and block 0's key hashes a namespace (model + adapter instance) with its tokens, so a
key names the whole prefix up to the end of its block, for one set of weights (as vLLM's automatic prefix
caching). A new prompt reuses the longest run of leading blocks found here; only whole blocks are kept.

Memory is bounded: every block's bytes are counted, and beyond ``budget_bytes`` the least recently used
blocks go first. A prefix is touched from its last block to its first, so within a prefix the deepest block
is the older one and is evicted first; a block's descendants go with it (nothing could reach them).

The store only holds tensors; it never looks inside them, so its logic is tested without torch.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence


def block_keys(namespace: bytes, tokens: Sequence[int], block_size: int, start: int = 0,
               previous: bytes | None = None) -> list[bytes]:
    """Keys of the whole blocks of ``tokens`` from block ``start`` on (``previous``: the key of block
    ``start - 1``, needed when ``start > 0``)."""
    keys: list[bytes] = []
    parent = namespace if start == 0 else previous
    if parent is None:
        raise ValueError("block_keys needs the previous block's key when start > 0")
    for i in range(start, len(tokens) // block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass
class _Block:
    kv: Any
    nbytes: int
    parent: bytes | None
    namespace: bytes


class PrefixCache:
    def __init__(self, budget_bytes: int, block_size: int = 16):
        self.budget_bytes = max(0, int(budget_bytes))
        self.block_size = block_size
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self._children: dict[bytes, set[bytes]] = {}
        self.bytes = 0
        self.hits = 0  # blocks reused
        self.inserted = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def match(self, keys: Sequence[bytes], skip: int = 0) -> list[Any]:
        """The stored blocks of the longest leading run of ``keys``; marks them recently used. The first
        ``skip`` blocks are already held by the caller (not counted as hits)."""
        found: list[bytes] = []
        for key in keys:
            if key not in self._blocks:
                break
            found.append(key)
        self._touch(found)
        self.hits += max(0, len(found) - skip)
        return [self._blocks[k].kv for k in found]

    def insert(self, namespace: bytes, keys: Sequence[bytes], block_kv: Callable[[int], Any],
               block_bytes: int) -> int:
        """Store blocks ``keys`` (a prefix's keys, in order) that are missing; ``block_kv(i)`` makes block i's
        tensor (a copy) and is only called for missing blocks. Returns how many were added."""
        if block_bytes > self.budget_bytes:
            return 0
        added = 0
        parent: bytes | None = None
        for i, key in enumerate(keys):
            if key not in self._blocks:
                if parent is not None and parent not in self._blocks:
                    break  # the prefix above was evicted while inserting: keep the store consistent
                self._make_room(block_bytes, protect=set(keys[:i]))
                if self.bytes + block_bytes > self.budget_bytes:
                    break
                self._blocks[key] = _Block(block_kv(i), block_bytes, parent, namespace)
                if parent is not None:
                    self._children.setdefault(parent, set()).add(key)
                self.bytes += block_bytes
                added += 1
            parent = key
        self.inserted += added
        self._touch([k for k in keys if k in self._blocks])
        return added

    def drop_namespace(self, namespace: bytes) -> int:
        """Forget every block of one namespace (an unloaded adapter)."""
        doomed = [k for k, b in self._blocks.items() if b.namespace == namespace]
        for key in doomed:
            self._remove(key)
        return len(doomed)

    def clear(self) -> None:
        self._blocks.clear()
        self._children.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {"blocks": len(self._blocks), "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                "hit_blocks": self.hits, "inserted_blocks": self.inserted, "evicted_blocks": self.evicted}

    # ------------------------------------------------------------------------------------------------ internals
    def _touch(self, keys: Sequence[bytes]) -> None:
        for key in reversed(keys):  # the first block ends up most recent: leaves are evicted before roots
            self._blocks.move_to_end(key)

    def _make_room(self, needed: int, protect: set[bytes]) -> None:
        while self._blocks and self.bytes + needed > self.budget_bytes:
            victim = next((k for k in self._blocks if k not in protect), None)
            if victim is None:
                return
            self._remove(victim)

    def _remove(self, key: bytes) -> None:
        stack = [key]
        while stack:
            k = stack.pop()
            block = self._blocks.pop(k, None)
            if block is None:
                continue
            self.bytes -= block.nbytes
            self.evicted += 1
            stack.extend(self._children.pop(k, ()))
            if block.parent is not None and block.parent in self._children:
                self._children[block.parent].discard(k)
