"""Item vocabulary: external item keys <-> dense model ids, 0 reserved for padding.

Shared by the trainer (which builds it) and the device (which maps logged keys to ids);
stored in a bundle as ``items.json``."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from device_sdk.sessions import SESSION_KEY

PAD_KEY = ""


@dataclass
class ItemVocab:
    """``keys[i]`` is the external key of id i (``keys[0]`` is padding); ``popular`` lists
    ids best first, the fallback for a user with no history."""

    keys: list[str]
    popular: list[int] = field(default_factory=list)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.keys or self.keys[0] != PAD_KEY:
            raise ValueError("vocabulary must start with the padding key ''")
        self._index = {k: i for i, k in enumerate(self.keys)}
        if len(self._index) != len(self.keys):
            raise ValueError("vocabulary keys must be unique")
        # The separator is no item: a logged key equal to it maps to 0 (ignored) like any
        # unknown key, and only ``session_id`` names it.
        self._session = self._index.pop(SESSION_KEY, 0)
        bad = [i for i in self.popular if not 0 < i < len(self.keys) or i == self._session]
        if bad:
            raise ValueError(f"popular ids {bad[:5]} are not item ids (1..{len(self.keys) - 1}, "
                             "the session separator excluded)")

    @classmethod
    def from_items(cls, items: Iterable[str]) -> ItemVocab:
        """Ids by descending frequency (ties by key), so low ids are popular items."""
        counts = Counter(str(k) for k in items)
        counts.pop(PAD_KEY, None)
        counts.pop(SESSION_KEY, None)
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([PAD_KEY] + [k for k, _ in ordered])

    def __len__(self) -> int:
        return len(self.keys)

    def with_session(self) -> ItemVocab:
        """This vocabulary with the session separator (``SESSION_KEY``) as its last id, for
        a model trained with session boundaries; itself when it has one already."""
        if self.session_id:
            return self
        return ItemVocab(self.keys + [SESSION_KEY], list(self.popular))

    @property
    def session_id(self) -> int:
        """The session separator's id, 0 when the vocabulary has none."""
        return self._session

    def id_of(self, key: str) -> int:
        """The id of ``key``, 0 when unknown."""
        return self._index.get(key, 0)

    def ids(self, keys: Iterable[str]) -> np.ndarray:
        """int32 ids; keys not in the vocabulary map to 0 (padding, i.e. ignored)."""
        return np.fromiter((self._index.get(k, 0) for k in keys), dtype=np.int32)

    def digest(self) -> str:
        """sha256 over the ordered keys: two models agree on ids iff their digests agree."""
        return hashlib.sha256("\n".join(self.keys).encode("utf-8")).hexdigest()

    def to_json(self) -> bytes:
        return json.dumps({"keys": self.keys, "popular": self.popular}).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> ItemVocab:
        try:
            obj = json.loads(data)
            return cls(keys=[str(k) for k in obj["keys"]], popular=[int(i) for i in obj["popular"]])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise ValueError(f"items.json is not a valid item vocabulary: {exc}") from None
