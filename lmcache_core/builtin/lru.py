"""A byte-budgeted LRU index with pins, shared by the memory and disk tiers."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Hashable, Iterable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)


class LRUIndex(Generic[K]):
    """Keys with sizes in recency order. ``make_room`` picks victims, skipping pinned keys."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.used = 0
        self._sizes: OrderedDict[K, int] = OrderedDict()
        self._pins: dict[K, int] = {}
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._sizes))

    def add(self, key: K, size: int) -> None:
        old = self._sizes.pop(key, None)
        if old is not None:
            self.used -= old
        self._sizes[key] = size
        self.used += size

    def replace(self, items: "Iterable[tuple[K, int]]") -> None:
        """Forget every entry and take ``items`` (least recent first); pins are kept."""
        self._sizes = OrderedDict(items)
        self.used = sum(self._sizes.values())

    def touch(self, key: K) -> bool:
        if key in self._sizes:
            self._sizes.move_to_end(key)
            return True
        return False

    def remove(self, key: K) -> int | None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.used -= size
        return size

    def pin(self, key: K) -> None:
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: K) -> None:
        n = self._pins.get(key, 0)
        if n <= 1:
            self._pins.pop(key, None)
        else:
            self._pins[key] = n - 1

    def pin_many(self, keys: "Iterable[K]") -> None:
        """:meth:`pin` of each key (inlined: a lookup pins every chunk of a request)."""
        pins = self._pins
        count = pins.get
        with self.lock:
            for k in keys:
                pins[k] = count(k, 0) + 1

    def unpin_many(self, keys: "Iterable[K]") -> None:
        """:meth:`unpin` of each key (inlined)."""
        pins = self._pins
        with self.lock:
            for k in keys:
                n = pins.pop(k, 0)
                if n > 1:
                    pins[k] = n - 1

    def pinned(self, key: K) -> bool:
        return key in self._pins

    def pick(self, need: int) -> tuple[list[K], int]:
        """Least recent unpinned keys whose sizes add up to ``need`` bytes, and that sum;
        fewer when there are not enough (the sum then falls short of ``need``)."""
        victims: list[K] = []
        got = 0
        if need <= 0:
            return victims, got
        for key, ksize in self._sizes.items():
            if key in self._pins:
                continue
            victims.append(key)
            got += ksize
            if got >= need:
                break
        return victims, got

    def make_room(self, size: int) -> list[K] | None:
        """Victims (least recent first, never pinned) that free room for ``size`` bytes,
        or None when even evicting every unpinned key would not be enough."""
        if self.capacity is None:
            return []
        if size > self.capacity:
            return None
        need = self.used + size - self.capacity
        victims: list[K] = []
        if need <= 0:
            return victims
        for key, ksize in self._sizes.items():
            if key in self._pins:
                continue
            victims.append(key)
            need -= ksize
            if need <= 0:
                return victims
        return None
