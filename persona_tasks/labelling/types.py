"""Data passed into and out of a labeller, and the labeller protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class ClusterInput:
    """One cluster of one user's intent memories, as the labellers see it.

    ``memory_texts`` are ``marts.intent_memories.embedding_text`` (what the user meant: queries, titles; PII-masked
    upstream), the same text that was embedded and clustered; ``centrality`` is
    higher for more representative memories (e.g. cosine to the cluster centroid). ``other_clusters_texts``
    is optional extra contrast for the extractive labeller (texts of this user's other clusters); when a
    labeller is given all of a user's clusters at once it derives the contrast itself.
    """

    user_id: str
    cluster_id: str
    memory_ids: list[str]
    memory_texts: list[str]
    centrality: list[float] | None = None
    other_clusters_texts: list[list[str]] | None = None

    def __post_init__(self) -> None:
        if not self.memory_ids:
            raise ValueError(f"cluster {self.cluster_id!r} of user {self.user_id!r} has no memories")
        if len(self.memory_texts) != len(self.memory_ids):
            raise ValueError(f"cluster {self.cluster_id!r}: {len(self.memory_ids)} memory ids but "
                             f"{len(self.memory_texts)} memory texts")
        if self.centrality is None:
            self.centrality = [0.0] * len(self.memory_ids)
        elif len(self.centrality) != len(self.memory_ids):
            raise ValueError(f"cluster {self.cluster_id!r}: {len(self.memory_ids)} memory ids but "
                             f"{len(self.centrality)} centrality values")
        self.memory_texts = [t if isinstance(t, str) else "" for t in self.memory_texts]

    @property
    def key(self) -> tuple[str, str]:
        return (self.user_id, self.cluster_id)

    def by_centrality(self) -> list[int]:
        """Memory positions, most representative first (ties: input order)."""
        c = self.centrality or []
        return sorted(range(len(self.memory_ids)), key=lambda i: (-float(c[i]), i))


@dataclass
class PersonaLabel:
    """A persona for one cluster: what gets published (after PII scrubbing and validation)."""

    user_id: str
    cluster_id: str
    label: str
    description: str
    evidence_ids: list[str]
    labeller: str  # "llm" | "extractive"
    model_version: str
    fallback: bool = False  # True when the LLM labeller gave up and the extractive labeller answered
    attempts: int = 1  # generation attempts spent on this cluster (0 for the extractive labeller)
    repairs: list[str] = field(default_factory=list)  # deterministic fixes applied to the model output


@runtime_checkable
class Labeller(Protocol):
    name: str

    def label(self, clusters: list[ClusterInput]) -> list[PersonaLabel]:
        """One persona per input cluster, in input order. Batched internally; never raises on model output."""
        ...
