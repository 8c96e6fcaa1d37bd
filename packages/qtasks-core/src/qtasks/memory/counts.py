"""Counting the live entries of an append-only index list in any range, in O(log n)."""

from __future__ import annotations


class LiveCounts:
    """How many entries of an append-only list are still live, in any range of positions.

    A Fenwick tree over the positions (1 for live, 0 for dead): appending an entry, marking
    one dead and counting a range each cost O(log n), so
    :meth:`~qtasks.memory.MemoryStorage.count` costs the same whatever the range holds."""

    __slots__ = ("_tree",)

    def __init__(self) -> None:
        self._tree = [0]  # 1-based: node i sums the positions (i - lowbit(i), i]

    def append(self) -> int:
        """Add a live entry at the end; return its position (0-based)."""
        tree = self._tree
        node = len(tree)
        value, child, stop = 1, node - 1, node - (node & -node)
        while child > stop:  # the nodes that tile (stop, node - 1]
            value += tree[child]
            child -= child & -child
        tree.append(value)
        return node - 1

    def kill(self, position: int) -> None:
        """Mark the entry at ``position`` dead (once)."""
        tree = self._tree
        node = position + 1
        while node < len(tree):
            tree[node] -= 1
            node += node & -node

    def live(self, start: int, end: int) -> int:
        """Live entries at positions ``start`` (included) to ``end`` (excluded)."""
        return self._prefix(end) - self._prefix(start)

    def _prefix(self, end: int) -> int:
        tree, total = self._tree, 0
        while end > 0:
            total += tree[end]
            end -= end & -end
        return total
