"""Suite of ``gate_personas``: the staged run (personas.staged_personas) before it is published.

Frames: ``personas`` (one row per staged persona: ids, scores, a shape code, the fields holding PII, a hash of the
label: never its text) and ``run`` (one row: counts, coverage, the LLM fallback share, and drift against the last
published run: personas per user and the Jensen-Shannon distance of the topic mix). The hand-written gate's checks
keep their names and meaning (min_personas, persona_shape, pii, scored_share, coverage, quality_<score>).

Topic mix: the last published run's topics (personas.persona_topics, through its personas' topic_id) with their
centroids; each staged persona joins the nearest one when its cosine reaches ``[topics] join_min_similarity``,
else "other". The distance compares the two share vectors (base 2, in [0, 1]).
"""

from __future__ import annotations

from datetime import date
from typing import Any

import numpy as np

from persona_tasks.config import Settings
from persona_tasks.gates.checks import Check, Entry, Suite, metric

GATE = "gate_personas"
SCORES = ("cohesion", "alignment", "truthfulness", "objective")


def _gx():
    import great_expectations as gx

    return gx.expectations


def _entry(means: str, look: str, do: str, sql: tuple[str, ...] = ()) -> Entry:
    return Entry(GATE, means, look, do, sql)


_QUALITY_DO = ("A drop across the board points at the input (a new source, a changed export, a bot) or a changed "
               "model (`[embedding] backend` / `model_path`, `[labelling]`): compare the day's memories with the "
               "previous days'. Fix the cause and clear `label`; lower `[orchestration] quality_floors.{k}` only "
               "for a known, accepted change (docs/quality.md).")
_DRIFT_DO = ("Compare the staged run with the last published one (queries above). A broken input (one source "
             "missing, a bot) or labeller: fix it and clear `label`. A real change in behaviour: override the check "
             "for the day (`persona-etl gate override`) after looking at the personas.")


def pii_leaks(personas) -> list[tuple[str, str]]:
    """``(persona_id, field)`` of every label or description that ``scrub_pii`` would change (the labellers scrub
    their output; this is the last check before publishing). The text itself is never returned."""
    from persona_tasks.labelling.text import scrub_pii

    return [(pid, field) for pid, label, desc in personas.select("persona_id", "label", "description").iter_rows()
            for field, text in (("label", label), ("description", desc)) if text and scrub_pii(text) != text]


CHECKS: tuple[Check, ...] = (
    Check("min_personas", "run",
          lambda s, d: metric("personas", min_value=s.orchestration.min_personas),
          "block", "staged personas at least [orchestration] min_personas",
          _entry("Fewer staged personas than `[orchestration] min_personas`.", "The staged run's size:",
                 "Follow the counts upstream (memories, clusters); a small day by design: lower `min_personas`.",
                 ("SELECT count(*), count(DISTINCT user_id) FROM personas.staged_personas WHERE run_date = $d",))),
    Check("persona_shape", "personas",
          lambda s, d: _gx().ExpectColumnValuesToBeInSet(column="shape", value_set=["ok"]),
          "block", "every persona has a label, a description and evidence",
          _entry("A staged persona has an empty label or description, or no evidence.",
                 "The offending personas (ids and labeller, not their text):",
                 "A labeller bug: relabel with the extractive labeller (`[orchestration] labeller = "
                 "\"extractive\"`) to publish the day, and file a bug with the persona_ids.",
                 ("SELECT persona_id, labeller, is_fallback, n_evidence FROM personas.staged_personas WHERE "
                  "run_date = $d AND (trim(label) = '' OR trim(description) = '' OR n_evidence < 1)",))),
    Check("pii", "personas",
          lambda s, d: _gx().ExpectColumnValuesToBeInSet(column="pii_in", value_set=["none"]),
          "block", "no e-mail address, phone number, long digit run or URL query in a label or description",
          _entry("A staged persona's label or description holds an e-mail address, phone number, 6+ digit run or "
                 "URL query string. The labellers scrub these, so their scrubbing or validation is broken.",
                 "The check's unexpected_ids name the persona_ids and the Data Docs page the field; which labeller "
                 "wrote them (read the text only if you must, and never paste it into a ticket):",
                 "Never publish it (never override this check). Relabel the day with the extractive labeller to "
                 "publish, and file a bug against the labeller named in the row.",
                 ("SELECT persona_id, labeller, model_version, is_fallback FROM personas.staged_personas "
                  "WHERE run_date = $d ORDER BY persona_id LIMIT 20",))),
    Check("scored_share", "personas",
          lambda s, d: _gx().ExpectColumnValuesToNotBeNull(column="objective", mostly=s.orchestration.min_scored_share),
          "block", "at least [orchestration] min_scored_share of the personas have quality scores",
          _entry("Too few staged personas got quality scores (`min_scored_share`).",
                 "Unscored personas (the `score` log says which have no embedded memory):",
                 "Usually memories embedded under another model version than the personas: check that "
                 "`[embedding]` is the same for every worker, then clear `embed`.",
                 ("SELECT count(*) FILTER (WHERE objective IS NULL) AS unscored, count(*) AS staged "
                  "FROM personas.staged_personas WHERE run_date = $d",))),
    Check("coverage", "run",
          lambda s, d: metric("coverage", min_value=s.orchestration.min_coverage),
          "block", "share of memories that are some persona's evidence at least [orchestration] min_coverage",
          _entry("Too small a share of memories ended up as evidence of some persona (`min_coverage`).",
                 "The run's coverage and step statistics:",
                 "Mostly noise memories: look at the clustering settings (`[clustering]`) or a changed input mix.",
                 ("SELECT coverage, stats FROM personas.induction_runs WHERE run_date = $d",))),
    *(Check(f"quality_{k}", "personas",
            (lambda k: lambda s, d: _gx().ExpectColumnMeanToBeBetween(
                column=k, min_value=s.orchestration.quality_floors.get(k, 0.0)))(k),
            "block", f"mean {k} at least [orchestration] quality_floors.{k}",
            _entry(f"The staged run's mean {k} is below `[orchestration] quality_floors.{k}`.",
                   "The staged scores by labeller, and the last published days for comparison:",
                   _QUALITY_DO.format(k=k),
                   (f"SELECT labeller, count(*) AS n, avg({k}) AS {k} FROM personas.staged_personas WHERE "
                    "run_date = $d GROUP BY 1",
                    f"SELECT run_date, avg({k}) AS {k} FROM personas.personas WHERE run_date IN "
                    "(SELECT run_date FROM personas.induction_runs WHERE published_at IS NOT NULL "
                    "ORDER BY run_date DESC LIMIT 7) GROUP BY 1 ORDER BY 1 DESC")))
      for k in SCORES),
    *(Check(f"score_range_{k}", "personas",
            (lambda k: lambda s, d: _gx().ExpectColumnValuesToBeBetween(column=k, min_value=0.0, max_value=1.0))(k),
            "block", f"every {k} score in [0, 1]",
            _entry(f"A staged persona's {k} lies outside [0, 1]: the scoring code is broken (docs/quality.md).",
                   "The offending personas:",
                   "File a bug with the persona_ids and the `[quality]` settings; never publish the run.",
                   (f"SELECT persona_id, {k} FROM personas.staged_personas WHERE run_date = $d AND "
                    f"({k} < 0 OR {k} > 1)",)))
      for k in SCORES),
    Check("low_truthfulness_share", "personas",
          lambda s, d: _gx().ExpectColumnValuesToBeBetween(column="truthfulness", min_value=s.gates.truthfulness_floor,
                                                           mostly=1.0 - s.gates.max_low_truthfulness_share),
          "block", "personas under [gates] truthfulness_floor at most [gates] max_low_truthfulness_share",
          _entry("Too many staged personas make claims their evidence does not support (truthfulness under "
                 "`[gates] truthfulness_floor`): a labeller inventing content.",
                 "The least truthful personas and their labeller:",
                 "Usually the LLM labeller (a changed model or prompt): relabel the day with the extractive "
                 "labeller to publish, and file a bug with the persona_ids.",
                 ("SELECT persona_id, labeller, is_fallback, truthfulness FROM personas.staged_personas WHERE "
                  "run_date = $d ORDER BY truthfulness NULLS FIRST LIMIT 20",))),
    Check("labels_unique", "personas",
          lambda s, d: _gx().ExpectCompoundColumnsToBeUnique(column_list=["user_id", "label_key"]),
          "block", "no two personas of a user share a label",
          _entry("Two personas of one user have the same label: the labeller could not tell two clusters apart, "
                 "and analysts cannot either.",
                 "Users with repeated labels (ids only):",
                 "Usually too fine a clustering (`[clustering] merge_min_similarity`) or a labeller ignoring its "
                 "input: relabel with the other labeller or fix the clustering, then clear `store_clusters`.",
                 ("SELECT user_id, md5(lower(trim(label))) AS label_key, count(*) AS n FROM "
                  "personas.staged_personas WHERE run_date = $d GROUP BY ALL HAVING count(*) > 1",))),
    Check("llm_fallback_share", "run",
          lambda s, d: metric("llm_fallback_share", max_value=s.gates.max_llm_fallback_share, exempt_when_null=True),
          "warn", "clusters the LLM failed on (extractive fallback) at most [gates] max_llm_fallback_share",
          _entry("The LLM labeller failed validation on too many clusters, so the extractive labeller answered "
                 "for them (published anyway: fallbacks are valid personas).",
                 "The run's LLM statistics (rejection reasons per attempt):",
                 "A changed model, prompt or decoding setting (`[labelling]`): compare with the last run's stats; "
                 "docs/labelling.md.",
                 ("SELECT run_id, n_llm, n_fallbacks, stats FROM personas.induction_runs WHERE run_date = $d",))),
    Check("personas_per_user_drift", "run",
          lambda s, d: metric("personas_per_user_factor", max_value=s.gates.max_personas_per_user_factor,
                              exempt_when_null=True),
          "warn", "personas per user changed by at most a factor [gates] max_personas_per_user_factor (either "
                  "way) vs the same users in the last published run",
          _entry("Personas per user changed a lot against the last published run: the clustering or the input "
                 "changed.",
                 "Personas per user of the staged run and the recent published runs:",
                 _DRIFT_DO,
                 ("SELECT 'staged' AS run, count(*) / count(DISTINCT user_id) AS per_user FROM "
                  "personas.staged_personas WHERE run_date = $d UNION ALL SELECT run_date::VARCHAR, "
                  "count(*) / count(DISTINCT user_id) FROM personas.personas WHERE run_date < $d AND run_date IN "
                  "(SELECT run_date FROM personas.induction_runs WHERE published_at IS NOT NULL ORDER BY run_date "
                  "DESC LIMIT 8) GROUP BY 1 "
                  "ORDER BY 1 DESC LIMIT 8",))),
    Check("topic_mix_drift", "run",
          lambda s, d: metric("topic_js_distance", max_value=s.gates.max_topic_js_distance, exempt_when_null=True),
          "warn", "Jensen-Shannon distance of the topic mix vs the last published run at most "
                  "[gates] max_topic_js_distance",
          _entry("The staged personas spread over the last published run's topics very differently from that "
                 "run (Jensen-Shannon distance of the topic shares): a source went missing, a bot, or the "
                 "embedding model changed.",
                 "The last published run's topics with their shares:",
                 _DRIFT_DO,
                 ("SELECT topic_id, label, n_personas FROM personas.persona_topics WHERE run_date = (SELECT "
                  "max(run_date) FROM personas.persona_topics WHERE run_date < $d) ORDER BY n_personas DESC LIMIT 20",))),
)


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) of two share vectors."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(p, q, base=2.0))


def _matrix(col) -> np.ndarray:
    return np.asarray([np.asarray(v, dtype=np.float32) for v in col], dtype=np.float32)


def topic_mix_distance(settings: Settings, con, day: date, previous: date) -> float | None:
    """JS distance of the staged run's topic mix from the ``previous`` published run's (None without topics).

    The previous mix: its personas per topic (one GROUP BY over the history); the staged personas join the
    nearest topic of the latest fit (stored centroids), as new versions do on publish."""
    fit = con.execute("SELECT max(run_date) FROM personas.persona_topics WHERE run_date <= $p",
                      {"p": previous}).fetchall()
    fit = fit[0][0] if fit else None
    if fit is None:
        return None
    cents = con.execute("SELECT topic_id, centroid FROM personas.persona_topics WHERE run_date = $f AND centroid "
                        "IS NOT NULL ORDER BY topic_id", {"f": fit}).fetchall()
    prev = dict(con.execute("SELECT coalesce(topic_id, ''), count(*) FROM personas.persona_history WHERE "
                            "valid_from <= $p AND (valid_to IS NULL OR valid_to > $p) GROUP BY 1",
                            {"p": previous}).fetchall())
    staged = con.execute("SELECT embedding FROM personas.staged_persona_embeddings WHERE run_date = $d "
                         "ORDER BY persona_id", {"d": day}).fetchall()
    topics = [t for t, _ in cents]
    if not prev or not staged or not topics:
        return None
    cent = _matrix([c for _, c in cents])
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    x = _matrix([r[0] for r in staged])
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ cent.T
    best = sim.argmax(axis=1)
    joined = sim[np.arange(len(x)), best] >= settings.topics.join_min_similarity
    k = len(topics)
    q = np.bincount(np.where(joined, best, k), minlength=k + 1).astype(float)
    index = {t: i for i, t in enumerate(topics)}
    p = np.zeros(k + 1)
    for t, n in prev.items():
        p[index.get(t, k)] += n
    return js_distance(p / p.sum(), q / q.sum())


def load(settings: Settings, con, day: date, _inputs: Any = None) -> tuple[dict, dict[str, Any]]:
    import pandas as pd
    import polars as pl

    from persona_tasks.warehouse import query_pl

    staged = query_pl(con, """
        SELECT persona_id, user_id, label, description, md5(lower(trim(label))) AS label_key,
               CASE WHEN coalesce(trim(label), '') = '' THEN 'empty_label'
                    WHEN coalesce(trim(description), '') = '' THEN 'empty_description'
                    WHEN n_evidence < 1 THEN 'no_evidence' ELSE 'ok' END AS shape,
               labeller, is_fallback, cohesion, alignment, truthfulness, objective
        FROM personas.staged_personas WHERE run_date = $d ORDER BY persona_id""", {"d": day})
    leaks: dict[str, list[str]] = {}
    for pid, fld in pii_leaks(staged):
        leaks.setdefault(pid, []).append(fld)
    staged = staged.with_columns(pl.col("persona_id").map_elements(lambda p: "+".join(leaks.get(p, [])) or "none",
                                                                    return_dtype=pl.String).alias("pii_in"))
    frame = staged.drop("label", "description").to_pandas()  # never the text itself in GX results or Data Docs
    for k in SCORES:
        frame[k] = frame[k].astype("float64")
    n = len(frame)
    cov = con.execute("SELECT max(coverage) FROM personas.induction_runs WHERE run_date = $d", {"d": day}).fetchall()
    coverage = cov[0][0] if cov else None
    n_asked = int(((frame["labeller"] == "llm") | frame["is_fallback"]).sum()) if n else 0
    n_fallback = int(frame["is_fallback"].sum()) if n else 0
    previous = con.execute("SELECT max(run_date) FROM personas.induction_runs WHERE run_date < $d "
                           "AND published_at IS NOT NULL", {"d": day}).fetchall()
    previous = previous[0][0] if previous else None
    ppu_change = js = None
    if previous is not None and n:
        # the same users before and now: a run stages its active users only (persona_tasks.identity)
        before = dict(con.execute(
            "SELECT user_id, count(*) FROM personas.personas WHERE run_date = $p AND user_id IN "
            "(SELECT user_id FROM personas.staged_personas WHERE run_date = $d) GROUP BY 1",
            {"p": previous, "d": day}).fetchall())
        same = frame[frame["user_id"].isin(list(before))]
        if before and len(same):
            ratio = (len(same) / same["user_id"].nunique()) / (sum(before.values()) / len(before))
            ppu_change = max(ratio, 1.0 / ratio)
        js = topic_mix_distance(settings, con, day, previous)
    run = pd.DataFrame([{"personas": n, "users": int(frame["user_id"].nunique()) if n else 0,
                         "coverage": coverage, "llm_asked": n_asked,
                         "llm_fallback_share": n_fallback / n_asked if n_asked else None,
                         "previous_run_date": previous, "personas_per_user_factor": ppu_change,
                         "topic_js_distance": js}])
    for c in ("coverage", "llm_fallback_share", "personas_per_user_factor", "topic_js_distance"):
        run[c] = run[c].astype("float64")
    means = {k: (None if frame[k].isna().all() else round(float(frame[k].mean()), 6)) for k in SCORES} if n else \
        {k: None for k in SCORES}
    facts = {"personas": n, "scored": int(frame["objective"].notna().sum()) if n else 0,
             "coverage": None if coverage is None else round(float(coverage), 6), "means": means,
             "previous_run_date": None if previous is None else previous.isoformat(),
             "topic_js_distance": None if js is None else round(js, 4),
             "personas_per_user_factor": None if ppu_change is None else round(ppu_change, 4)}
    return {"personas": frame, "run": run}, facts


SUITE = Suite(gate=GATE, frames={"personas": "persona_id", "run": None}, checks=CHECKS, load=load)
