"""Item vocabulary: external item keys <-> dense ids, 0 reserved for padding."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

PAD_KEY = ""


@dataclass
class ItemVocab:
    """``keys[i]`` is the external key of id i; ``keys[0]`` is the padding slot."""

    keys: list[str]
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.keys or self.keys[0] != PAD_KEY:
            raise ValueError("vocabulary must start with the padding key ''")
        self._index = {k: i for i, k in enumerate(self.keys)}
        if len(self._index) != len(self.keys):
            raise ValueError("vocabulary keys must be unique")

    @classmethod
    def from_items(cls, items: Iterable[str]) -> ItemVocab:
        """Ids by descending frequency (ties by key), so low ids are popular items."""
        counts = pd.Series(list(items), dtype=str).value_counts()
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([PAD_KEY] + [k for k, _ in ordered])

    def __len__(self) -> int:
        return len(self.keys)

    def ids(self, keys: Iterable[str]) -> np.ndarray:
        """int32 ids; keys not in the vocabulary map to 0 (padding, i.e. ignored)."""
        return np.fromiter((self._index.get(k, 0) for k in keys), dtype=np.int32)

    def digest(self) -> str:
        """sha256 over the ordered keys: two models agree on ids iff their digests agree."""
        return hashlib.sha256("\n".join(self.keys).encode("utf-8")).hexdigest()
