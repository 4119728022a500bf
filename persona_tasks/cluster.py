"""Per-user intent clustering: group each user's memory embeddings into intent clusters (future personas).

Composable pieces, BERTopic style: a **Reducer** (identity, UMAP, PCA) maps a user's L2-normalised embeddings
to the space a **Clusterer** (HDBSCAN, average-linkage agglomerative) works in; a named **Strategy** is one
reducer plus one clusterer (registry ``STRATEGIES``, chosen by ``[clustering] strategy``); the
**ClusteringPipeline** runs a strategy per user and applies the rules below, which are the same for every
strategy. All scoring, merging and noise handling happen on the original embeddings (cosine), whatever space the
clusterer saw.

Strategies (``bench/bench_clustering.py`` compares them on planted personas):

- ``hdbscan_direct`` (default): HDBSCAN on the cosine distances of the 384-d embeddings. On normalised vectors
  cosine distance orders pairs exactly like Euclidean distance, so this is HDBSCAN on the raw embeddings. One
  spanning tree per user serves every ``min_cluster_size`` candidate. No numba, no compile cost.
- ``umap_hdbscan`` (the design document's method): UMAP (cosine, ``umap_n_components`` dims, seeded) then
  HDBSCAN (Euclidean) on the reduced points.
- ``global_umap_hdbscan``: one UMAP (cosine, ``umap_n_components`` dims, seeded) fitted on a stable sample of
  ``global_umap_fit_sample`` memories of *all* users, then HDBSCAN (Euclidean) per user on their memories' UMAP
  coordinates (``GlobalUMAP.transform``). The fit is stored (``ensure_global_umap``: ``model.npz`` and
  ``meta.json`` under ``global_umap_dir/<embedding model version>/<fit date>/``, default
  ``<warehouse folder>/models/global_umap``) and reused by every day within ``global_umap_refit_days`` of it; a new
  embedding model version, other UMAP settings or an older fit trigger a refit on the memories up to the day. The
  daily run fits (when due) in its embed step, which has the warehouse, and every shard loads that one fit. The
  transform is exact-neighbour and scaled per memory (``GlobalUMAP``), so a memory's coordinates depend only on it
  and the stored fit: a user's clusters are the same whichever other users are active that day and however the
  users are sharded, and a rerun of a day gives identical clusters. Rule 2 does not apply (the transform needs no
  room: small users are placed like any memory). Without a stored fit (tests, benchmarks, the evaluation)
  ``cluster_frame`` fits one on a sample of the frame it clusters.
- ``pca_hdbscan``: PCA (``pca_n_components``) then HDBSCAN; a cheap linear reducer for comparison.
- ``agglomerative``: average-linkage clustering on cosine distance, cut at each of
  ``agglomerative_distance_candidates``; never produces noise.

Why ``hdbscan_direct`` is the default (``bench/bench_clustering.py``, synth users with 1-4 planted personas, real
MiniLM embeddings, same rules for every strategy; mean per-user ARI, unassigned memories as singletons; 2 busy
cores, 1 BLAS thread):

==================  =====  =====  =======================  ===========================
method              ARI    NMI    users/s (200 users x 30)  speed-up vs the naive loop
==================  =====  =====  =======================  ===========================
naive UMAP+HDBSCAN  0.572  0.611  13                        1x
hdbscan_direct      0.878  0.884  351                       28x
pca_hdbscan         0.872  0.878  253                       20x
umap_hdbscan        0.876  0.892  14                        1.1x
agglomerative       0.712  0.723  411                       33x
==================  =====  =====  =======================  ===========================

UMAP buys nothing once the rules below are applied (ARI 0.876 vs 0.878; it is slightly better on users with one
persona, slightly worse on users with several) and costs ~25x the time plus a numba compile per process.
``global_umap_hdbscan`` (one UMAP for all users, stored, applied with ``transform``;
``bench/results/bench_clustering_global_umap.json``, 10,000 resampled users on ``embedding_text``, UMAP fitted on
5,000 memories of other synth users) raises planted-persona ARI / NMI from 0.729 / 0.744 to 0.776 / 0.799 at 3.8x
the default's time (97 s against 26 s per 10,000 users; fit 3 s, once per refit period). On the real AOL sample it
does not win: persona-text Hit@10 55.71 -> 54.06, multi-centroid 61.36 -> 61.80, multi-evidence 62.95 -> 63.68, with
9.3 personas per user instead of 7.9. So the default stays ``hdbscan_direct``; the evaluation on real data decides.

Almost all of the gain over the naive loop comes from the rules: the naive loop leaves single-persona users
split (HDBSCAN never returns one cluster: ARI 0 on them) and splits personas into sub-topics. The parameter
values (``min_samples=1``, candidates 3/5/8, merge at 0.3, noise join at 0.2) were chosen on two generators
(``persona_tasks.synth`` and a hand-written query-log one) where they were best or within 0.01 of best on both.
The silhouette ("cohesion") of the naive loop is *higher* (0.30 vs 0.26): silhouette rewards splitting a persona
into tight sub-topics, which is why the rules merge same-intent clusters before candidates are compared.

Rules, in order, per user (memories in canonical order: ``started_at`` then ``memory_id``, so the result never
depends on input row order):

1. **Few memories.** A user with fewer than ``min_memories`` memories (default 3) is not clustered: all memories
   form one cluster (rule ``few_memories``; one memory is a single-memory cluster, rule ``single_memory``).
   There is no evidence to split on, and a persona of one or two memories is still better than none.
2. **Small users skip UMAP.** UMAP needs ``n_neighbors < n`` and a spectral layout needs room; a user with fewer
   than ``umap_min_memories`` memories is clustered on the embeddings themselves (as ``hdbscan_direct``).
   ``n_neighbors`` is capped at ``n - 1``; PCA components at ``n - 1``.
3. **Candidates.** The clusterer produces one labelling per candidate hyperparameter
   (``min_cluster_size_candidates`` for HDBSCAN, with ``min_samples`` fixed; distance cut-offs for
   agglomerative). Candidates not smaller than ``n`` are skipped.
4. **Same-intent merge.** In each labelling, the two clusters with the highest mean pairwise cosine similarity
   are merged while that similarity is at least ``merge_min_similarity`` (average linkage on the clusters).
   HDBSCAN on short texts finds dense *sub*-topics (the same query repeated); merging reunites sub-topics of
   one intent. ``None`` turns this off.
5. **Noise.** A noise memory (HDBSCAN label -1) joins the cluster whose centroid (normalised mean of the
   cluster's non-noise members) is most similar to it when that cosine similarity is at least
   ``noise_join_min_similarity`` (``is_noise_reassigned``); otherwise it stays unassigned (``cluster_id``
   null). Centroids are computed before any noise joins, so the order of noise points does not matter.
   **Coverage** = share of a user's memories in some cluster (1.0 unless memories stay unassigned); it is
   reported per user and is the share of memories that can become some persona's evidence.
6. **No cluster.** If no candidate finds any cluster, all memories form one cluster (rule ``no_cluster``).
7. **Selection by cohesion.** Each candidate's final labelling is scored by the mean silhouette (cosine
   distance, original embeddings) over *all* the user's memories, where unassigned memories and members of
   one-memory clusters count 0 (so leaving memories out is penalised); a labelling with a single cluster scores
   0 (no structure found beyond one intent). The best score wins; ties (to 1e-9) go to the coarser candidate
   (larger ``min_cluster_size`` / larger distance cut-off). Everything is deterministic: fixed seeds (UMAP
   ``random_state=seed``, single-threaded), stable sorts, fixed tie-breaks.
8. **Output.** ``cluster_id`` is user-local, 0-based, numbered by each cluster's earliest memory;
   ``centrality`` is a memory's cosine similarity to its cluster's final centroid (pick the top ones as
   representative memories); per-user stats give ``n_memories, n_clusters, n_noise, n_reassigned,
   n_unassigned, coverage, cohesion, param`` (the chosen candidate) and ``rule``.

Scale. Users are independent: ``cluster_users(settings, frame, shard=i, n_shards=k)`` processes the users whose
stable hash (md5 of ``user_id``, first 8 hex digits, modulo ``k``; the same expression in SQL is
``shard_sql``) falls in shard ``i``, so an Airflow DAG can map over shards. Progress and users/s are logged.
UMAP's numba functions compile on their first call in a process (~7-8 s here): ``warm_up`` pays that once per
worker before the timed loop, and pointing ``NUMBA_CACHE_DIR`` at a writable, persistent directory lets
umap/pynndescent's ``cache=True`` functions reuse compiled code across processes. The default strategy uses no
numba at all.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Protocol

import duckdb
import numpy as np
import polars as pl
from threadpoolctl import threadpool_limits

from persona_tasks.config import ClusteringSettings, Settings
from persona_tasks.embed import EMBEDDINGS_TABLE, embeddings_to_numpy, ensure_schema
from persona_tasks.errors import PersonaEtlError
from persona_tasks.progress import Progress, set_threads
from persona_tasks.quality import silhouette_samples
from persona_tasks.warehouse import transaction
from persona_tasks.sampling import stable_sample_indices

log = logging.getLogger(__name__)

COSINE = "cosine"        # distances are 1 - cosine similarity of L2-normalised rows
EUCLIDEAN = "euclidean"

_TIE = 1e-9


class ClusteringError(PersonaEtlError):
    """Bad clustering input or configuration."""


# ---------------------------------------------------------------------------------------------------------------
# Reducers
# ---------------------------------------------------------------------------------------------------------------

class Reducer(Protocol):
    name: str

    def reduce(self, x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
        """Map one user's normalised embeddings ``(n, d)`` to ``(points, metric)`` for the clusterer."""
        ...


@dataclass(frozen=True)
class IdentityReducer:
    name: str = "identity"

    def reduce(self, x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
        return x, COSINE


@dataclass(frozen=True)
class UMAPReducer:
    n_components: int = 5
    n_neighbors: int = 15
    min_dist: float = 0.0
    min_memories: int = 10  # below this the user is clustered on the embeddings themselves (rule 2)
    name: str = "umap"

    def reduce(self, x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
        n = x.shape[0]
        if n < max(self.min_memories, self.n_components + 2, 3):
            return x, COSINE
        import umap

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # n_jobs overridden by random_state; small-n spectral warnings
            z = umap.UMAP(
                n_components=self.n_components,
                n_neighbors=max(2, min(self.n_neighbors, n - 1)),
                min_dist=self.min_dist,
                metric="cosine",
                random_state=seed,
                n_jobs=1,
                low_memory=True,
                verbose=False,
            ).fit_transform(x)
        return np.asarray(z, dtype=np.float64), EUCLIDEAN


@dataclass(frozen=True)
class PCAReducer:
    n_components: int = 10
    name: str = "pca"

    def reduce(self, x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
        n, d = x.shape
        k = min(self.n_components, n - 1, d)
        if k < 2:
            return x, COSINE
        xc = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
        # deterministic: full SVD, signs fixed so each component's largest loading is positive
        u, s, vt = np.linalg.svd(xc, full_matrices=False)
        signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(axis=1)])
        signs[signs == 0] = 1
        return (u[:, :k] * s[:k]) * signs, EUCLIDEAN


# --- one UMAP for all users (global_umap_hdbscan) ---------------------------------------------------------------

GLOBAL_UMAP_RECIPE = "global-umap-v1"   # bump when the fit or the transform below changes meaning


@dataclass(frozen=True)
class GlobalUMAP:
    """A UMAP fitted once on a sample of all users' memory embeddings, applied to any memory with ``transform``.

    Stored as plain arrays (``model.npz``: the fit sample's normalised embeddings and their UMAP coordinates, the
    curve parameters ``a, b``) plus ``meta.json`` (embedding model version, fit date, sample size, parameters,
    seed, library versions): no pickle, so a stored model loads under any umap-learn version.

    ``transform`` follows ``umap.UMAP.transform`` (fuzzy k-nearest-neighbour graph to the fit sample, start at the
    weighted mean of the neighbours' coordinates, SGD with the sample fixed) with two changes that make a memory's
    coordinates depend only on that memory and the model, never on the other memories transformed with it (so a
    user's clusters do not depend on the day's other active users or on the shard count): exact neighbours (one
    matrix product with the sample, instead of an approximate index whose random state is shared by a batch), and
    edge weights scaled by their maximum possible value 1 instead of the batch's maximum. umap's SGD already seeds
    each point's negative sampling from its own starting coordinates and never moves the sample.
    """

    sample: np.ndarray       # (s, d) float32, L2-normalised embeddings the UMAP was fitted on
    embedding: np.ndarray    # (s, k) float32, their UMAP coordinates
    a: float
    b: float
    meta: dict

    @property
    def n_components(self) -> int:
        return int(self.embedding.shape[1])

    def transform(self, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """UMAP coordinates ``(n, k)`` float64 of L2-normalised embeddings ``(n, d)``; row by row independent."""
        from sklearn.utils import check_random_state
        from umap.layouts import optimize_layout_euclidean
        from umap.umap_ import smooth_knn_dist

        n = x.shape[0]
        k_out = self.n_components
        if n == 0:
            return np.zeros((0, k_out))
        m = self.meta
        k = int(min(m["n_neighbors"], self.sample.shape[0]))
        n_epochs = int(m["transform_epochs"])
        x = np.ascontiguousarray(x, dtype=np.float32)
        idx = np.empty((n, k), dtype=np.int32)
        dst = np.empty((n, k), dtype=np.float32)
        # cosine similarity (rows normalised) in float64, then rounded to float32: an AVX-512 float32 GEMM sums in an
        # order that depends on the batch's shape (up to 5e-5 apart on the same row), which made a memory's
        # neighbours, hence its coordinates, depend on the other memories of the call; float64 sums rounded to
        # float32 agree
        sample64 = self.sample.astype(np.float64)
        for a0 in range(0, n, chunk):
            s = (x[a0:a0 + chunk].astype(np.float64) @ sample64.T).astype(np.float32)
            part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(
                np.arange(s.shape[1]), (s.shape[0], 1))
            d = np.clip(1.0 - np.take_along_axis(s, part, axis=1), 0.0, 2.0)
            order = np.lexsort((part, d), axis=1)                     # by distance, ties by sample index
            idx[a0:a0 + chunk] = np.take_along_axis(part, order, axis=1)
            dst[a0:a0 + chunk] = np.take_along_axis(d, order, axis=1)
        # as umap.UMAP.transform: local_connectivity - 1 = 0, so no distance offset
        sigmas, rhos = smooth_knn_dist(dst, float(k), local_connectivity=0.0)
        w = np.where(dst - rhos[:, None] <= 0.0, 1.0,
                     np.exp(-(dst - rhos[:, None]) / sigmas[:, None])).astype(np.float32)
        # start: weighted mean of the neighbours' coordinates (a memory identical to a sample memory starts there)
        emb = self.embedding
        z = np.einsum("nk,nkc->nc", w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12), emb[idx]).astype(np.float32)
        exact = w >= 1.0
        if exact.any():
            rows = np.flatnonzero(exact.any(axis=1))
            first = np.where(exact[rows], idx[rows], np.iinfo(np.int32).max).min(axis=1)
            z[rows] = emb[first]
        # SGD: edges below 1/n_epochs of the largest possible weight (1) are dropped, as umap drops those below
        # 1/n_epochs of the batch's largest; an edge of weight w is sampled every 1/w epochs
        keep = w >= 1.0 / n_epochs
        head = np.repeat(np.arange(n, dtype=np.int32), k)[keep.ravel()]
        tail = idx.ravel()[keep.ravel()].astype(np.int32)
        weight = w.ravel()[keep.ravel()].astype(np.float64)
        epochs_per_sample = 1.0 / weight
        rng_state = check_random_state(int(m["seed"])).randint(np.iinfo(np.int32).min, np.iinfo(np.int32).max,
                                                               3).astype(np.int64)
        z = np.ascontiguousarray(z)
        z = optimize_layout_euclidean(
            z, emb.astype(np.float32, copy=True), head, tail, n_epochs, self.sample.shape[0], epochs_per_sample,
            self.a, self.b, rng_state, 1.0, 1.0 / 4.0, float(m.get("negative_sample_rate", 5)), False,
            verbose=False, move_other=False,
        )
        return np.asarray(z, dtype=np.float64)

    # --- persistence ---------------------------------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        """Write ``model.npz`` and ``meta.json`` into ``path`` (a new folder, renamed into place: atomic)."""
        import json
        import shutil
        import tempfile

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            np.savez(tmp / "model.npz", sample=self.sample, embedding=self.embedding,
                     ab=np.array([self.a, self.b], dtype=np.float64))
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2, sort_keys=True, default=str))
            tmp.chmod(0o755)
            if path.exists():
                shutil.rmtree(path)
            tmp.replace(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: Path) -> GlobalUMAP:
        import json

        path = Path(path)
        with np.load(path / "model.npz") as f:
            sample, embedding, ab = f["sample"], f["embedding"], f["ab"]
        meta = json.loads((path / "meta.json").read_text())
        return cls(np.ascontiguousarray(sample, dtype=np.float32), np.ascontiguousarray(embedding, dtype=np.float32),
                   float(ab[0]), float(ab[1]), meta)


def fit_global_umap(x: np.ndarray, cfg: ClusteringSettings, **meta) -> GlobalUMAP:
    """Fit the global UMAP on normalised embeddings ``x`` (the sample; seeded, single-threaded: deterministic).

    ``meta``: recorded with the model (``model_version``, ``fitted_on``, ...)."""
    import umap

    x = np.ascontiguousarray(x, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        model = umap.UMAP(
            n_components=cfg.umap_n_components,
            n_neighbors=max(2, min(cfg.umap_n_neighbors, x.shape[0] - 1)),
            min_dist=cfg.umap_min_dist,
            metric="cosine",
            n_epochs=cfg.global_umap_fit_epochs,
            random_state=cfg.seed,
            n_jobs=1,
            low_memory=True,
            verbose=False,
        ).fit(x)
    info = {
        "recipe": GLOBAL_UMAP_RECIPE, "n_sample": int(x.shape[0]), "dim": int(x.shape[1]),
        "n_components": cfg.umap_n_components, "n_neighbors": int(model.n_neighbors), "min_dist": cfg.umap_min_dist,
        "fit_epochs": cfg.global_umap_fit_epochs, "transform_epochs": cfg.global_umap_transform_epochs,
        "negative_sample_rate": int(model.negative_sample_rate), "seed": cfg.seed,
        "fit_seconds": round(time.perf_counter() - t0, 2), "umap_learn": umap.__version__,
        "sample_digest": hashlib.sha256(x.tobytes()).hexdigest()[:16],
    }
    info.update(meta)
    return GlobalUMAP(x, np.ascontiguousarray(model.embedding_, dtype=np.float32), float(model._a),
                      float(model._b), info)


@dataclass(frozen=True)
class GlobalUMAPReducer:
    """Reducer of ``global_umap_hdbscan``: a memory's coordinates in one UMAP fitted for all users.

    ``model`` None: ``prepare`` fits one on a stable sample (md5 of ``memory_id``) of the frame being clustered
    (tests, benchmarks, evaluation); the daily run passes the persisted model (``ensure_global_umap``)."""

    model: GlobalUMAP | None = None
    fit_sample: int = 5_000
    name: str = "global_umap"

    def prepare(self, x: np.ndarray, memory_ids: Sequence[str], cfg: ClusteringSettings) -> GlobalUMAPReducer:
        if self.model is not None:
            self.check(cfg, x.shape[1])
            return self
        idx = stable_sample_indices(list(memory_ids), self.fit_sample)
        log.info("cluster: fitting a global UMAP on %d of %d memories (no persisted model given)", idx.size,
                 x.shape[0])
        return GlobalUMAPReducer(fit_global_umap(x[idx], cfg, model_version=None, fitted_on=None),
                                 self.fit_sample, self.name)

    def check(self, cfg: ClusteringSettings, dim: int) -> None:
        m = self.model.meta if self.model is not None else {}
        if self.model is not None and (m.get("dim") != dim or m.get("recipe") != GLOBAL_UMAP_RECIPE):
            raise ClusteringError(f"global UMAP model (dim {m.get('dim')}, {m.get('recipe')}) does not fit "
                                  f"embeddings of dim {dim} / recipe {GLOBAL_UMAP_RECIPE}")

    def transform(self, x: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise ClusteringError("global UMAP reducer without a model: call prepare() first")
        return self.model.transform(x)

    def reduce(self, x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
        return self.transform(x), EUCLIDEAN


def warm_up(strategy: Strategy | str | None = None, cfg: ClusteringSettings | None = None) -> float:
    """Run the strategy once on a tiny input so numba compilation (UMAP) happens before the real work.

    Returns the seconds it took (≈0 for strategies without numba). Call once per worker process.
    """
    cfg = cfg or ClusteringSettings()
    strat = get_strategy(strategy or cfg.strategy, cfg)
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(max(cfg.umap_min_memories, 20), 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if isinstance(strat.reducer, GlobalUMAPReducer):
        model = strat.reducer.model
        if model is None:  # compiles the fit's numba functions too (the in-process fit needs them)
            model = fit_global_umap(x, cfg)
        else:
            x = rng.normal(size=(20, model.sample.shape[1]))
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        model.transform(x)
        return time.perf_counter() - t0
    strat.reducer.reduce(x.astype(np.float32), cfg.seed)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# Clusterers
# ---------------------------------------------------------------------------------------------------------------

class Clusterer(Protocol):
    name: str

    def candidates(self, n: int) -> list[float]:
        """Hyperparameter values to try for a user with ``n`` memories, ascending = finer to coarser."""
        ...

    def fit_candidates(self, z: np.ndarray, metric: str, dist: np.ndarray | None,
                       candidates: Sequence[float]) -> list[np.ndarray]:
        """One int labelling (``-1`` = noise) per candidate. ``dist``: the cosine distance matrix of ``z`` when
        ``metric`` is cosine (already computed by the pipeline)."""
        ...


def _pairwise(z: np.ndarray, metric: str, dist: np.ndarray | None) -> np.ndarray:
    if metric == COSINE:
        if dist is not None:
            return dist
        s = z.astype(np.float64) @ z.astype(np.float64).T
        d = np.clip(1.0 - s, 0.0, 2.0)
    else:
        z = z.astype(np.float64)
        sq = (z * z).sum(axis=1)
        d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0))
    np.fill_diagonal(d, 0.0)
    return d


try:  # the Cython core of the hdbscan package (pinned in requirements/lock.txt); tests check it against the API
    from hdbscan._hdbscan_linkage import label as _hdb_label
    from hdbscan._hdbscan_linkage import mst_linkage_core as _hdb_mst
    from hdbscan._hdbscan_reachability import mutual_reachability as _hdb_mutual_reachability
    from hdbscan.hdbscan_ import _tree_to_labels as _hdb_tree_to_labels

    _HDBSCAN_CORE = True
except ImportError:  # pragma: no cover - other hdbscan layout: use the public estimator
    _HDBSCAN_CORE = False


@dataclass(frozen=True)
class HDBSCANClusterer:
    """HDBSCAN (hdbscan package) on a precomputed distance matrix, ``min_samples`` fixed across candidates.

    With ``min_samples`` fixed the mutual-reachability spanning tree does not depend on ``min_cluster_size``, so it
    is built once per user and only the (cheap) condensed-tree step runs per candidate. The result equals
    ``hdbscan.HDBSCAN(min_cluster_size=m, min_samples=min_samples, metric="precomputed")`` (tested); the
    estimator's per-call validation overhead, which dominates at ~30 points, is skipped.
    """

    min_cluster_sizes: tuple[int, ...] = (2, 3, 5)
    min_samples: int = 2
    name: str = "hdbscan"

    def candidates(self, n: int) -> list[float]:
        return [m for m in sorted(set(self.min_cluster_sizes)) if 2 <= m < n]

    def single_linkage_tree(self, d: np.ndarray) -> np.ndarray:
        n = d.shape[0]
        ms = max(1, min(n - 1, self.min_samples))
        # (mutual_reachability works in place: give it a copy, the caller still needs d)
        mr = _hdb_mutual_reachability(np.array(d, dtype=np.float64, copy=True, order="C"), ms, 1.0)
        mst = _hdb_mst(mr)
        # sorted exactly as hdbscan does (ties in mutual reachability are common; same order, same tree)
        mst = mst[np.argsort(mst.T[2]), :]
        return _hdb_label(mst)

    def fit_candidates(self, z: np.ndarray, metric: str, dist: np.ndarray | None,
                       candidates: Sequence[float]) -> list[np.ndarray]:
        d = _pairwise(z, metric, dist)
        if not _HDBSCAN_CORE:  # pragma: no cover
            import hdbscan

            return [hdbscan.HDBSCAN(min_cluster_size=int(m), min_samples=self.min_samples,
                                    metric="precomputed").fit_predict(d) for m in candidates]
        tree = self.single_linkage_tree(d)
        return [np.asarray(_hdb_tree_to_labels(d, tree, int(m))[0], dtype=np.int64) for m in candidates]


@dataclass(frozen=True)
class AgglomerativeClusterer:
    """Average-linkage agglomerative clustering on cosine distance (original embeddings), cut at each threshold."""

    distance_thresholds: tuple[float, ...] = (0.6, 0.7, 0.8)
    name: str = "agglomerative"

    def candidates(self, n: int) -> list[float]:
        return sorted(set(float(t) for t in self.distance_thresholds))

    def fit_candidates(self, z: np.ndarray, metric: str, dist: np.ndarray | None,
                       candidates: Sequence[float]) -> list[np.ndarray]:
        from scipy.cluster.hierarchy import fcluster, linkage
        from scipy.spatial.distance import squareform

        d = _pairwise(z, metric, dist)
        tree = linkage(squareform(d, checks=False), method="average")
        return [fcluster(tree, t=float(t), criterion="distance").astype(np.int64) - 1 for t in candidates]


# ---------------------------------------------------------------------------------------------------------------
# Strategies (registry)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Strategy:
    name: str
    reducer: Reducer
    clusterer: Clusterer
    description: str = ""


StrategyFactory = Callable[[ClusteringSettings], Strategy]
STRATEGIES: dict[str, StrategyFactory] = {}


def register_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    def deco(factory: StrategyFactory) -> StrategyFactory:
        STRATEGIES[name] = factory
        return factory

    return deco


def _hdbscan(cfg: ClusteringSettings) -> HDBSCANClusterer:
    return HDBSCANClusterer(tuple(int(m) for m in cfg.min_cluster_size_candidates), int(cfg.min_samples))


@register_strategy("hdbscan_direct")
def _hdbscan_direct(cfg: ClusteringSettings) -> Strategy:
    return Strategy("hdbscan_direct", IdentityReducer(), _hdbscan(cfg),
                    "HDBSCAN on cosine distances of the full embeddings")


@register_strategy("umap_hdbscan")
def _umap_hdbscan(cfg: ClusteringSettings) -> Strategy:
    return Strategy(
        "umap_hdbscan",
        UMAPReducer(cfg.umap_n_components, cfg.umap_n_neighbors, cfg.umap_min_dist, cfg.umap_min_memories),
        _hdbscan(cfg),
        "UMAP (cosine) then HDBSCAN, per user",
    )


@register_strategy("global_umap_hdbscan")
def _global_umap_hdbscan(cfg: ClusteringSettings) -> Strategy:
    return Strategy("global_umap_hdbscan", GlobalUMAPReducer(None, cfg.global_umap_fit_sample), _hdbscan(cfg),
                    "one UMAP fitted on a sample of all users' memories (transform), then HDBSCAN per user")


@register_strategy("pca_hdbscan")
def _pca_hdbscan(cfg: ClusteringSettings) -> Strategy:
    return Strategy("pca_hdbscan", PCAReducer(cfg.pca_n_components), _hdbscan(cfg), "PCA then HDBSCAN, per user")


@register_strategy("agglomerative")
def _agglomerative(cfg: ClusteringSettings) -> Strategy:
    return Strategy("agglomerative", IdentityReducer(),
                    AgglomerativeClusterer(tuple(float(t) for t in cfg.agglomerative_distance_candidates)),
                    "average-linkage agglomerative clustering on cosine distance")


def get_strategy(strategy: Strategy | str, cfg: ClusteringSettings) -> Strategy:
    if isinstance(strategy, Strategy):
        return strategy
    try:
        return STRATEGIES[strategy](cfg)
    except KeyError:
        raise ClusteringError(
            f"clustering strategy {strategy!r} is not registered (known: {', '.join(sorted(STRATEGIES))})"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Scoring and rules (shared by all strategies; all on cosine of the original embeddings)
# ---------------------------------------------------------------------------------------------------------------

def _one_hot(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labs = np.unique(labels[labels >= 0])
    return labs, (labels[:, None] == labs[None, :]).astype(np.float64)


def cohesion(dist: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette over all points (cosine distance); noise and one-point clusters count 0; <2 clusters = 0.

    The per-point silhouette is ``persona_tasks.quality.silhouette_samples`` (one implementation, shared with the
    personas' cohesion score); noise points (NaN there) count 0 in the mean over all ``n`` points.
    """
    n = labels.shape[0]
    if n == 0:
        return 0.0
    s = silhouette_samples(dist, labels)
    return float(s[labels >= 0].sum() / n)


def merge_similar(labels: np.ndarray, sim: np.ndarray, min_similarity: float | None) -> np.ndarray:
    """Rule 4: merge the most similar pair of clusters (mean pairwise cosine) while it is >= min_similarity."""
    if min_similarity is None:
        return labels
    labels = labels.copy()
    labs, m = _one_hot(labels)
    while labs.size >= 2:
        counts = m.sum(axis=0)
        mean_sim = (m.T @ sim @ m) / np.outer(counts, counts)
        np.fill_diagonal(mean_sim, -np.inf)
        flat = int(np.argmax(mean_sim))          # first maximum in row-major order: deterministic
        i, j = divmod(flat, labs.size)
        if mean_sim[i, j] < min_similarity:
            break
        i, j = min(i, j), max(i, j)
        labels[labels == labs[j]] = labs[i]
        m[:, i] += m[:, j]
        m = np.delete(m, j, axis=1)
        labs = np.delete(labs, j)
    return labels


def centroids(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster labels, L2-normalised mean of each cluster's members)."""
    labs, m = _one_hot(labels)
    if labs.size == 0:
        return labs, np.zeros((0, x.shape[1]))
    c = (m.T @ x.astype(np.float64)) / m.sum(axis=0)[:, None]
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return labs, c


def join_noise(x: np.ndarray, labels: np.ndarray, min_similarity: float) -> tuple[np.ndarray, np.ndarray]:
    """Rule 5: noise joins the nearest centroid if cosine >= min_similarity. Returns (labels, joined mask)."""
    noise = labels < 0
    if not noise.any():
        return labels, noise
    labs, c = centroids(x, labels)
    if labs.size == 0:
        return labels, np.zeros_like(noise)
    s = x[noise].astype(np.float64) @ c.T
    best = s.argmax(axis=1)
    ok = s[np.arange(best.size), best] >= min_similarity
    out = labels.copy()
    idx = np.flatnonzero(noise)
    out[idx[ok]] = labs[best[ok]]
    joined = np.zeros_like(noise)
    joined[idx[ok]] = True
    return out, joined


def renumber(labels: np.ndarray) -> np.ndarray:
    """Cluster ids 0.. in order of each cluster's first memory (rows are in time order); -1 stays -1."""
    out = np.full_like(labels, -1)
    valid = labels >= 0
    if valid.any():
        labs, first = np.unique(labels[valid], return_index=True)
        rank = np.empty(labs.size, dtype=labels.dtype)
        rank[np.argsort(first, kind="stable")] = np.arange(labs.size, dtype=labels.dtype)
        out[valid] = rank[np.searchsorted(labs, labels[valid])]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class UserClustering:
    labels: np.ndarray          # final user-local cluster ids (-1 = unassigned)
    noise: np.ndarray           # bool: HDBSCAN called it noise (before rule 5)
    reassigned: np.ndarray      # bool: noise that joined a cluster (rule 5)
    centrality: np.ndarray      # cosine to own cluster centroid (nan if unassigned)
    rule: str
    param: float | None
    score: float                # cohesion of the chosen labelling

    @property
    def n_clusters(self) -> int:
        return int(self.labels.max()) + 1 if self.labels.size and self.labels.max() >= 0 else 0

    @property
    def coverage(self) -> float:
        return float((self.labels >= 0).mean()) if self.labels.size else 0.0


class ClusteringPipeline:
    """A strategy plus the per-user rules of this module's docstring."""

    def __init__(self, cfg: ClusteringSettings | None = None, strategy: Strategy | str | None = None):
        self.cfg = cfg or ClusteringSettings()
        self.strategy = get_strategy(strategy or self.cfg.strategy, self.cfg)

    def cluster_user(self, x: np.ndarray, z: np.ndarray | None = None) -> UserClustering:
        """Cluster one user's L2-normalised embeddings ``(n, d)``, rows in canonical (time) order.

        ``z``: the rows already reduced (Euclidean; a global reducer transforms all users at once)."""
        cfg = self.cfg
        n = x.shape[0]
        if n == 0:
            e = np.zeros(0, dtype=np.int64)
            return UserClustering(e, e.astype(bool), e.astype(bool), np.zeros(0), "empty", None, 0.0)
        x = x.astype(np.float64, copy=False)
        if n < max(cfg.min_memories, 2):
            return self._single(x, "single_memory" if n == 1 else "few_memories")
        sim = x @ x.T
        dist = np.clip(1.0 - sim, 0.0, 2.0)
        np.fill_diagonal(dist, 0.0)
        clusterer = self.strategy.clusterer
        cands = clusterer.candidates(n)
        best: tuple[float, float, np.ndarray, np.ndarray, np.ndarray] | None = None
        if cands:
            z, metric = (z, EUCLIDEAN) if z is not None else self.strategy.reducer.reduce(x, cfg.seed)
            labelings = clusterer.fit_candidates(z, metric, dist if metric == COSINE and z is x else None, cands)
            for param, raw in zip(cands, labelings):
                raw = np.asarray(raw, dtype=np.int64)
                if raw.max(initial=-1) < 0:
                    continue  # this candidate found no cluster
                merged = merge_similar(raw, sim, cfg.merge_min_similarity)
                final, joined = join_noise(x, merged, cfg.noise_join_min_similarity)
                score = cohesion(dist, final)
                # ties (within 1e-9) go to the later, coarser candidate
                if best is None or score >= best[0] - _TIE:
                    best = (score, float(param), final, raw < 0, joined)
        if best is None:
            return self._single(x, "no_cluster")
        score, param, final, noise, joined = best
        labels = renumber(final)
        return UserClustering(labels, noise, joined, self._centrality(x, labels), "clustered", param, score)

    def _single(self, x: np.ndarray, rule: str) -> UserClustering:
        n = x.shape[0]
        labels = np.zeros(n, dtype=np.int64)
        f = np.zeros(n, dtype=bool)
        return UserClustering(labels, f, f.copy(), self._centrality(x, labels), rule, None, 0.0)

    @staticmethod
    def _centrality(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        out = np.full(labels.shape[0], np.nan)
        labs, c = centroids(x, labels)
        if labs.size:
            ok = labels >= 0
            out[ok] = np.einsum("ij,ij->i", x[ok], c[np.searchsorted(labs, labels[ok])])
        return out


# ---------------------------------------------------------------------------------------------------------------
# Frames, shards, warehouse
# ---------------------------------------------------------------------------------------------------------------

def shard_of(user_id: str, n_shards: int) -> int:
    """Stable shard of a user: md5 of user_id, first 8 hex digits as an integer, modulo n_shards."""
    return int(hashlib.md5(user_id.encode("utf-8")).hexdigest()[:8], 16) % n_shards


def shard_sql(column: str, n_shards: int) -> str:
    """The same shard as ``shard_of`` as a DuckDB expression."""
    return f"(('0x' || substr(md5({column}), 1, 8))::UBIGINT % {int(n_shards)})"


def shard_filter(frame: pl.DataFrame, shard: int | None, n_shards: int | None) -> pl.DataFrame:
    if shard is None and n_shards is None:
        return frame
    if shard is None or n_shards is None or n_shards < 1 or not 0 <= shard < n_shards:
        raise ClusteringError(f"shard must be in 0..n_shards-1 (got shard={shard}, n_shards={n_shards})")
    users = frame["user_id"].unique()
    keep = users.filter(pl.Series([shard_of(u, n_shards) == shard for u in users.to_list()], dtype=pl.Boolean))
    return frame.filter(pl.col("user_id").is_in(keep.implode()))


@dataclass
class ClusteringResult:
    assignments: pl.DataFrame   # user_id, memory_id, cluster_id, centrality, is_noise, is_noise_reassigned
    users: pl.DataFrame         # one row of stats per user
    strategy: str
    seconds: float

    def summary(self) -> dict:
        u = self.users
        if u.is_empty():
            return {"users": 0, "memories": 0, "strategy": self.strategy, "seconds": round(self.seconds, 3)}
        return {
            "users": u.height,
            "memories": int(u["n_memories"].sum()),
            "strategy": self.strategy,
            "seconds": round(self.seconds, 3),
            "users_per_s": round(u.height / self.seconds, 1) if self.seconds > 0 else None,
            "mean_clusters": round(float(u["n_clusters"].mean()), 3),
            "coverage": round(float(u["n_assigned"].sum() / u["n_memories"].sum()), 4),
            "mean_user_coverage": round(float(u["coverage"].mean()), 4),
            "noise_share": round(float(u["n_noise"].sum() / u["n_memories"].sum()), 4),
            "reassigned_share": round(float(u["n_reassigned"].sum() / u["n_memories"].sum()), 4),
            "mean_cohesion": round(float(u["cohesion"].mean()), 4),
            "rules": dict(sorted(u.group_by("rule").len().iter_rows())),
        }


ASSIGNMENT_SCHEMA = {
    "user_id": pl.String, "memory_id": pl.String, "cluster_id": pl.Int32, "centrality": pl.Float32,
    "is_noise": pl.Boolean, "is_noise_reassigned": pl.Boolean,
}
USER_SCHEMA = {
    "user_id": pl.String, "n_memories": pl.Int32, "n_clusters": pl.Int32, "n_assigned": pl.Int32,
    "n_noise": pl.Int32, "n_reassigned": pl.Int32, "n_unassigned": pl.Int32, "coverage": pl.Float64,
    "cohesion": pl.Float64, "param": pl.Float64, "rule": pl.String, "strategy": pl.String,
}


def canonical_order(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows sorted by user_id, started_at (when present), memory_id: the order every rule works in."""
    missing = {"user_id", "memory_id", "embedding"} - set(frame.columns)
    if missing:
        raise ClusteringError(f"embeddings frame: missing column(s) {sorted(missing)}")
    keys = ["user_id"] + (["started_at"] if "started_at" in frame.columns else []) + ["memory_id"]
    return frame.sort(keys, nulls_last=True, maintain_order=True)


def cluster_frame(
    frame: pl.DataFrame,
    cfg: ClusteringSettings | None = None,
    strategy: Strategy | str | None = None,
    *,
    progress_name: str = "cluster",
) -> ClusteringResult:
    """Cluster every user of ``frame`` (``user_id, memory_id, embedding`` [, ``started_at``]).

    ``embedding``: list or array column of floats (normalised here). Returns assignments in canonical order
    (user_id, started_at, memory_id) and per-user stats.
    """
    pipe = ClusteringPipeline(cfg, strategy)
    t0 = time.perf_counter()
    frame = canonical_order(frame)
    n = frame.height
    x = embeddings_to_numpy(frame["embedding"]) if n else np.zeros((0, 1), dtype=np.float32)
    if n and not np.isfinite(x).all():
        raise ClusteringError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(norms, 1e-12)
    reduced = None
    if isinstance(pipe.strategy.reducer, GlobalUMAPReducer) and n:
        # one model for every user: fitted here on a sample of the frame unless the strategy carries one
        reducer = pipe.strategy.reducer.prepare(x, frame["memory_id"].to_list(), pipe.cfg)
        pipe.strategy = replace(pipe.strategy, reducer=reducer)
        t1 = time.perf_counter()
        with threadpool_limits(1):
            reduced = reducer.transform(x)
        log.info("cluster: global UMAP transform of %d memories in %.1fs", n, time.perf_counter() - t1)
    user_col = frame["user_id"]
    # user boundaries (frame is sorted by user_id)
    if n:
        starts = np.flatnonzero(np.r_[True, (user_col[1:] != user_col[:-1]).to_numpy()])
    else:
        starts = np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], n].astype(np.int64)
    labels = np.empty(n, dtype=np.int32)
    central = np.empty(n, dtype=np.float32)
    noise = np.empty(n, dtype=bool)
    joined = np.empty(n, dtype=bool)
    stats: dict[str, list] = {k: [] for k in USER_SCHEMA}
    user_ids = user_col.gather(starts).to_list() if n else []
    # per-user matrices are tiny (~30 x 384): BLAS threads only add overhead there (25x slower measured on a busy
    # 2-core machine), so the loop runs single-threaded; parallelism comes from shards (processes)
    with Progress(progress_name, total=len(starts), unit="users") as progress, threadpool_limits(1):
        for uid, a, b in zip(user_ids, starts.tolist(), ends.tolist()):
            r = pipe.cluster_user(x[a:b], None if reduced is None else reduced[a:b])
            labels[a:b] = r.labels
            central[a:b] = r.centrality
            noise[a:b] = r.noise
            joined[a:b] = r.reassigned
            n_assigned = int((r.labels >= 0).sum())
            for k, v in (
                ("user_id", uid), ("n_memories", b - a), ("n_clusters", r.n_clusters), ("n_assigned", n_assigned),
                ("n_noise", int(r.noise.sum())), ("n_reassigned", int(r.reassigned.sum())),
                ("n_unassigned", b - a - n_assigned), ("coverage", r.coverage), ("cohesion", r.score),
                ("param", r.param), ("rule", r.rule), ("strategy", pipe.strategy.name),
            ):
                stats[k].append(v)
            progress.update(1)
    assignments = pl.DataFrame(
        {
            "user_id": user_col,
            "memory_id": frame["memory_id"],
            "cluster_id": pl.Series(labels, dtype=pl.Int32),
            "centrality": pl.Series(central, dtype=pl.Float32),
            "is_noise": pl.Series(noise),
            "is_noise_reassigned": pl.Series(joined),
        },
    ).with_columns(
        pl.when(pl.col("cluster_id") >= 0).then(pl.col("cluster_id")).alias("cluster_id"),
        pl.col("centrality").fill_nan(None),
    )
    users = pl.DataFrame(stats, schema=USER_SCHEMA)
    return ClusteringResult(assignments, users, pipe.strategy.name, time.perf_counter() - t0)


def cluster_users(
    settings: Settings,
    embeddings: pl.DataFrame,
    shard: int | None = None,
    n_shards: int | None = None,
    strategy: Strategy | str | None = None,
    global_umap: GlobalUMAP | None = None,
) -> ClusteringResult:
    """Cluster the users of one shard (all users when ``shard``/``n_shards`` are None) with the configured strategy.

    ``embeddings``: ``user_id, memory_id, embedding`` [, ``started_at``] (see ``load_cluster_input``). Pins
    torch/BLAS threads to ``settings.threads`` and warms UMAP up first when the strategy uses it.
    ``global_umap``: the stored model of ``global_umap_hdbscan`` (``ensure_global_umap``); without one that
    strategy fits a model on this frame's memories (so the result would depend on the shard: a warning).
    """
    set_threads(settings.threads)
    cfg = settings.clustering
    strat = get_strategy(strategy or cfg.strategy, cfg)
    frame = shard_filter(embeddings, shard, n_shards)
    if isinstance(strat.reducer, GlobalUMAPReducer):
        if global_umap is not None:
            strat = replace(strat, reducer=replace(strat.reducer, model=global_umap))
        elif strat.reducer.model is None and frame.height:
            log.warning("cluster: %s without a stored global UMAP: fitting one on this input's memories", strat.name)
    if isinstance(strat.reducer, (UMAPReducer, GlobalUMAPReducer)) and frame.height:
        log.info("cluster: numba warm-up %.1fs", warm_up(strat, cfg))
    result = cluster_frame(frame, cfg, strat, progress_name=f"cluster[{strat.name}]"
                           + (f" shard {shard}/{n_shards}" if shard is not None else ""))
    log.info("cluster: %s", result.summary())
    return result


# --- the stored global UMAP -------------------------------------------------------------------------------------

def global_umap_root(settings: Settings) -> Path:
    """``[clustering] global_umap_dir`` (relative to the project), default ``<warehouse folder>/models/global_umap``."""
    d = settings.clustering.global_umap_dir
    if d is None:
        return Path(settings.warehouse).parent / "models" / "global_umap"
    return d if d.is_absolute() else settings.project_dir / d


def _safe_name(v: str) -> str:
    return "".join(c if c.isalnum() or c in "._+-" else "-" for c in v)


def _fit_params(cfg: ClusteringSettings) -> dict:
    """What a stored fit must agree on with the settings to be reused."""
    return {"recipe": GLOBAL_UMAP_RECIPE, "n_components": cfg.umap_n_components, "min_dist": cfg.umap_min_dist,
            "fit_epochs": cfg.global_umap_fit_epochs, "transform_epochs": cfg.global_umap_transform_epochs,
            "seed": cfg.seed, "fit_sample": cfg.global_umap_fit_sample, "n_neighbors_asked": cfg.umap_n_neighbors}


def find_global_umap(settings: Settings, model_version: str, run_date: date) -> Path | None:
    """The stored fit a day uses: for ``model_version``, with the configured parameters, the latest fitted on or
    before ``run_date`` and less than ``global_umap_refit_days`` before it (None: a fit is due)."""
    import json

    d = global_umap_root(settings) / _safe_name(model_version)
    if not d.is_dir():
        return None
    want = _fit_params(settings.clustering)
    for p in sorted((q for q in d.iterdir() if q.is_dir() and not q.name.startswith(".")), reverse=True):
        try:
            fitted = date.fromisoformat(p.name)
            meta = json.loads((p / "meta.json").read_text())
        except (ValueError, OSError):
            continue
        if fitted > run_date:
            continue
        if (run_date - fitted).days >= settings.clustering.global_umap_refit_days:
            return None
        if meta.get("model_version") == model_version and all(meta.get(k) == v for k, v in want.items()):
            return p
    return None


def ensure_global_umap(settings: Settings, con: duckdb.DuckDBPyConnection, model_version: str,
                       run_date: date) -> Path:
    """The folder of the global UMAP a day uses (``find_global_umap``), fitted and stored first when due: on a
    stable sample (smallest md5 of ``memory_id``) of ``global_umap_fit_sample`` memories of all users that started
    before the end of ``run_date`` and whose current text is embedded with ``model_version``. Fitting is seeded
    and single-threaded, so refitting the same day gives the same model."""
    from persona_tasks.days import day_end

    found = find_global_umap(settings, model_version, run_date)
    if found is not None:
        return found
    cfg = settings.clustering
    ensure_schema(con)
    t0 = time.perf_counter()
    rows = con.sql(
        f"""
        SELECT m.memory_id, e.embedding
        FROM marts.intent_memories m
        JOIN {EMBEDDINGS_TABLE} e
          ON e.memory_id = m.memory_id AND e.model_version = $v AND e.text_md5 = md5(coalesce(m.embedding_text, ''))
        WHERE m.started_at < $end
        ORDER BY md5(m.memory_id), m.memory_id
        LIMIT $k
        """,
        params={"v": model_version, "end": day_end(run_date), "k": int(cfg.global_umap_fit_sample)},
    ).pl()
    if rows.height < max(cfg.umap_n_neighbors + 1, 3):
        raise ClusteringError(f"global UMAP: only {rows.height} embedded memories up to {run_date}; "
                              f"not enough to fit (needs more than n_neighbors={cfg.umap_n_neighbors})")
    x = embeddings_to_numpy(rows["embedding"])
    model = fit_global_umap(x, cfg, model_version=model_version, fitted_on=run_date.isoformat(),
                            n_neighbors_asked=cfg.umap_n_neighbors, fit_sample=cfg.global_umap_fit_sample)
    path = model.save(global_umap_root(settings) / _safe_name(model_version) / run_date.isoformat())
    log.info("cluster: fitted the global UMAP on %d memories in %.1fs -> %s", rows.height,
             time.perf_counter() - t0, path)
    return path


def global_umap_for(settings: Settings, con: duckdb.DuckDBPyConnection, model_version: str,
                    run_date: date | None = None) -> GlobalUMAP | None:
    """The stored global UMAP when the configured strategy uses one (fitted first when due); else None."""
    strat = get_strategy(settings.clustering.strategy, settings.clustering)
    if not isinstance(strat.reducer, GlobalUMAPReducer):
        return None
    day = run_date or datetime.now(timezone.utc).date()
    return GlobalUMAP.load(ensure_global_umap(settings, con, model_version, day))


# --- warehouse --------------------------------------------------------------------------------------------------

CLUSTERS_DDL = """
CREATE SCHEMA IF NOT EXISTS personas;

-- One row per clustered memory: its user-local intent cluster. Written by persona_tasks.cluster.
CREATE TABLE IF NOT EXISTS personas.memory_clusters (
    user_id              VARCHAR   NOT NULL,
    memory_id            VARCHAR   NOT NULL,
    cluster_id           INTEGER,              -- user-local, 0.. by first memory; NULL = unassigned noise
    centrality           FLOAT,                -- cosine to the cluster centroid (NULL when unassigned)
    is_noise             BOOLEAN   NOT NULL,   -- HDBSCAN noise before the join rule
    is_noise_reassigned  BOOLEAN   NOT NULL,   -- noise that joined its nearest cluster
    model_version        VARCHAR   NOT NULL,
    strategy             VARCHAR   NOT NULL,
    clustered_at         TIMESTAMP NOT NULL,   -- UTC
    PRIMARY KEY (memory_id)
);

-- One row per clustered user: what the rules did.
CREATE TABLE IF NOT EXISTS personas.user_clusterings (
    user_id        VARCHAR   NOT NULL PRIMARY KEY,
    n_memories     INTEGER   NOT NULL,
    n_clusters     INTEGER   NOT NULL,
    n_assigned     INTEGER   NOT NULL,
    n_noise        INTEGER   NOT NULL,
    n_reassigned   INTEGER   NOT NULL,
    n_unassigned   INTEGER   NOT NULL,
    coverage       DOUBLE    NOT NULL,       -- share of memories in some cluster
    cohesion       DOUBLE    NOT NULL,       -- score of the chosen labelling (see persona_tasks.cluster)
    param          DOUBLE,                   -- chosen candidate (min_cluster_size / distance cut-off)
    rule           VARCHAR   NOT NULL,       -- clustered | few_memories | single_memory | no_cluster
    strategy       VARCHAR   NOT NULL,
    model_version  VARCHAR   NOT NULL,
    clustered_at   TIMESTAMP NOT NULL
);
"""


def load_cluster_input(
    con: duckdb.DuckDBPyConnection,
    model_version: str,
    shard: int | None = None,
    n_shards: int | None = None,
    users: list[str] | None = None,
) -> pl.DataFrame:
    """``user_id, memory_id, started_at, embedding`` of the memories of ``marts.intent_memories`` whose current
    text is embedded with ``model_version`` (optionally one shard of users, or only ``users``, filtered in SQL)."""
    ensure_schema(con)
    where = ""
    params: dict = {"v": model_version}
    if users is not None:
        where += " AND m.user_id IN (SELECT unnest($users))"
        params["users"] = list(users)
    if shard is not None or n_shards is not None:
        if shard is None or n_shards is None or not 0 <= shard < n_shards:
            raise ClusteringError(f"shard must be in 0..n_shards-1 (got shard={shard}, n_shards={n_shards})")
        where += f" AND {shard_sql('m.user_id', n_shards)} = {int(shard)}"
    return con.sql(
        f"""
        SELECT m.user_id, m.memory_id, m.started_at, e.embedding
        FROM marts.intent_memories m
        JOIN {EMBEDDINGS_TABLE} e
          ON e.memory_id = m.memory_id AND e.model_version = $v AND e.text_md5 = md5(coalesce(m.embedding_text, ''))
        WHERE true {where}
        ORDER BY m.user_id, m.started_at, m.memory_id
        """,
        params=params,
    ).pl()


def write_clusters(
    con: duckdb.DuckDBPyConnection,
    result: ClusteringResult,
    model_version: str,
    shard: int | None = None,
    n_shards: int | None = None,
) -> None:
    """Replace the stored clustering of the result's users (and, for a shard, of every user of that shard)."""
    con.execute(CLUSTERS_DDL)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    a = result.assignments.with_columns(
        pl.lit(model_version).alias("model_version"), pl.lit(result.strategy).alias("strategy"),
        pl.lit(now).alias("clustered_at"),
    )
    u = result.users.drop("strategy").with_columns(
        pl.lit(result.strategy).alias("strategy"), pl.lit(model_version).alias("model_version"),
        pl.lit(now).alias("clustered_at"),
    )
    con.register("_clu_a", a.to_arrow())
    con.register("_clu_u", u.to_arrow())
    try:
        with transaction(con):
            for table in ("personas.memory_clusters", "personas.user_clusterings"):
                if shard is not None and n_shards is not None:
                    con.execute(f"DELETE FROM {table} WHERE {shard_sql('user_id', n_shards)} = {int(shard)}")
                con.execute(f"DELETE FROM {table} WHERE user_id IN (SELECT user_id FROM _clu_u)")
            con.execute(
                "INSERT INTO personas.memory_clusters SELECT user_id, memory_id, cluster_id, centrality, is_noise, "
                "is_noise_reassigned, model_version, strategy, clustered_at FROM _clu_a")
            con.execute(
                "INSERT INTO personas.user_clusterings SELECT user_id, n_memories, n_clusters, n_assigned, n_noise, "
                "n_reassigned, n_unassigned, coverage, cohesion, param, rule, strategy, model_version, clustered_at "
                "FROM _clu_u")
    finally:
        con.unregister("_clu_a")
        con.unregister("_clu_u")


def run_clustering(
    settings: Settings,
    con: duckdb.DuckDBPyConnection | None = None,
    shard: int | None = None,
    n_shards: int | None = None,
    model_version: str | None = None,
) -> ClusteringResult:
    """Load one shard's embeddings from the warehouse, cluster it, and store the result (the DAG's task body)."""
    from persona_tasks.embed import embedder_from_settings
    from persona_tasks.warehouse import connect

    version = model_version or embedder_from_settings(settings).model_version
    own = con is None
    if own:
        con = connect(settings)
    try:
        frame = load_cluster_input(con, version, shard, n_shards)
        result = cluster_users(settings, frame, strategy=settings.clustering.strategy,
                               global_umap=global_umap_for(settings, con, version))
        write_clusters(con, result, version, shard, n_shards)
        return result
    finally:
        if own:
            con.close()


__all__ = [
    "STRATEGIES", "AgglomerativeClusterer", "ClusteringPipeline", "ClusteringResult", "Clusterer", "GlobalUMAP",
    "GlobalUMAPReducer", "HDBSCANClusterer", "IdentityReducer", "PCAReducer", "Reducer", "Strategy", "UMAPReducer",
    "UserClustering",
    "canonical_order", "cluster_frame", "cluster_users", "cohesion", "ensure_global_umap", "find_global_umap",
    "fit_global_umap", "get_strategy", "global_umap_for", "global_umap_root", "join_noise",
    "load_cluster_input", "merge_similar", "register_strategy", "run_clustering", "shard_of", "shard_sql",
    "warm_up", "write_clusters",
]
