"""A radix tree over token ids: which cached sequences share the longest prefix with a request.

Every edge holds a run of tokens; every node knows the keys of all entries below it, so the
deepest point a request's tokens reach names every entry that shares that many tokens.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence


class _Node:
    __slots__ = ("edges", "keys")

    def __init__(self):
        self.edges: dict[int, tuple[tuple[int, ...], _Node]] = {}  # first token -> (label, child)
        self.keys: set[Hashable] = set()  # entries whose tokens pass through (or end at) this node


def common_prefix(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """Length of the common prefix of a and b[start:]."""
    n = min(len(a), len(b) - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i


def _ends_at(node: _Node) -> bool:
    """Whether some entry's tokens end exactly at `node` (it is in no child's keys)."""
    below = set().union(*(child.keys for _, child in node.edges.values()))
    return bool(node.keys - below)


class PrefixTree:
    def __init__(self):
        self._root = _Node()
        self._tokens: dict[Hashable, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._tokens

    def tokens(self, key: Hashable) -> tuple[int, ...]:
        return self._tokens[key]

    def insert(self, key: Hashable, tokens: Sequence[int]) -> None:
        if key in self._tokens:
            self.remove(key)
        tokens = tuple(tokens)
        self._tokens[key] = tokens
        node, i = self._root, 0
        node.keys.add(key)
        while i < len(tokens):
            edge = node.edges.get(tokens[i])
            if edge is None:
                leaf = _Node()
                leaf.keys.add(key)
                node.edges[tokens[i]] = (tokens[i:], leaf)
                return
            label, child = edge
            n = common_prefix(label, tokens, i)
            if n < len(label):  # split the edge where the new tokens leave it
                mid = _Node()
                mid.keys = set(child.keys)
                mid.edges[label[n]] = (label[n:], child)
                node.edges[tokens[i]] = (label[:n], mid)
                child = mid
            child.keys.add(key)
            node, i = child, i + n

    def remove(self, key: Hashable) -> None:
        tokens = self._tokens.pop(key)
        path, node, i = [], self._root, 0
        node.keys.discard(key)
        while i < len(tokens):
            label, child = node.edges[tokens[i]]
            child.keys.discard(key)
            path.append((node, tokens[i]))
            node, i = child, i + len(label)
        for parent, first in reversed(path):  # prune empty branches, merge pass-through nodes
            label, child = parent.edges[first]
            if not child.keys:
                del parent.edges[first]
            elif len(child.edges) == 1 and not _ends_at(child):
                (sub_label, grandchild), = child.edges.values()
                parent.edges[first] = (label + sub_label, grandchild)

    def longest(self, tokens: Sequence[int]) -> tuple[int, set[Hashable]]:
        """(n, keys): the most leading tokens any entry shares with `tokens`, and the entries that share them."""
        node, i = self._root, 0
        while i < len(tokens):
            edge = node.edges.get(tokens[i])
            if edge is None:
                break
            label, child = edge
            n = common_prefix(label, tokens, i)
            i += n
            node = child
            if n < len(label):
                break
        return (i, set(node.keys)) if i else (0, set())
