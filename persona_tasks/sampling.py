"""Stable pseudo-random samples by md5 of a key: the same keys give the same sample on every machine and run, as
``ORDER BY md5(key)`` does in SQL. The evaluation's and the LLM's user samples, the global UMAP's and the topics'
fit samples and the training split's user order all draw this way.

Below every stage, so that none needs another stage for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Sequence

import numpy as np


def md5_key(key: object) -> str:
    """The md5 hex digest of ``str(key)`` (UTF-8), the sort key of every sample here."""
    return hashlib.md5(str(key).encode("utf-8")).hexdigest()


def stable_sample_indices(keys: Sequence[object], k: int) -> np.ndarray:
    """Indices of the ``k`` keys with the smallest md5, in that order."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    return np.argsort(np.array([md5_key(key) for key in keys]), kind="stable")[:k]


def stable_sample(values: Iterable[Hashable], n: int | None) -> list:
    """The distinct ``values`` in md5 order, the first ``n`` of them (all when ``n`` is None)."""
    ranked = sorted(set(values), key=md5_key)
    return ranked if n is None else ranked[:n]
