"""k-anonymous persona terms: only words that at least ``k`` distinct users wrote reach a labeller.

Why: search logs hold strings that identify one person: their own name, a neighbour's, a street, a small
business, a username (the 2006 AOL release was re-identified from exactly such queries). The PII scrubber masks
e-mail addresses, phone numbers and long digit runs, but cannot recognise a name. c-TF-IDF, by design, ranks the
words that are frequent in one cluster and rare elsewhere highest: such strings are what it would put into a label.

The rule: a word (``labelling.text.words`` tokenisation) is *public* when the memories of at least
``[labelling] min_term_users`` distinct users contain it (stop words and the words of the memory_text format,
"searched", "clicked", ..., always are), counted over the whole warehouse up to the run date
(``public_terms``) or over the evaluation's history (``PublicTerms.from_texts``). Before any labeller sees a
cluster, every non-public word of its memory texts is replaced by ``[rare]`` (``mask_clusters``): the extractive
labeller cannot pick it (the placeholder also breaks phrases), and the LLM never reads it, so neither can put it
into a published label or description. Evidence ids are untouched: a persona still links to every memory.

``min_term_users = 1`` turns the rule off. The default (2) removes the strings that exactly one user wrote; a
deployment with millions of users should raise it (5-10): common words stay public, identifiers do not.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date

from persona_tasks.labelling.text import _WORD, STOP_WORDS, words
from persona_tasks.labelling.types import ClusterInput

log = logging.getLogger(__name__)

RARE = "[rare]"


def _key(token: str) -> str:
    """A matched token as ``words`` returns it."""
    return token.lower().strip("'")


def users_per_word(pairs: Iterable[tuple[str, str | None]]) -> Counter[str]:
    """For every word, the number of distinct users with a text containing it. ``pairs`` of (user_id, text) must
    come grouped by user (one user's texts together): then only one user's words are held at a time."""
    counts: Counter[str] = Counter()
    current, words_of_user = None, set()
    for user, text in pairs:
        if user != current:
            counts.update(words_of_user)
            current, words_of_user = user, set()
        words_of_user.update(words(text or ""))
    counts.update(words_of_user)
    return counts


@dataclass(frozen=True)
class PublicTerms:
    """The words at least ``k`` users wrote; ``mask`` replaces the others in a text by ``[rare]``."""

    k: int
    public: frozenset[str]
    n_words: int  # distinct words seen, public or not

    @classmethod
    def from_counts(cls, counts: Counter[str], k: int) -> PublicTerms:
        return cls(k=k, public=frozenset(w for w, n in counts.items() if n >= k), n_words=len(counts))

    @classmethod
    def from_texts(cls, user_ids: Iterable[str], texts: Iterable[str | None], k: int) -> PublicTerms:
        return cls.from_counts(users_per_word(sorted(zip(user_ids, texts), key=lambda p: p[0])), k)

    def mask(self, text: str) -> str:
        if self.k <= 1 or not text:
            return text
        def keep(m) -> str:
            key = _key(m.group(0))
            return m.group(0) if key in self.public or key in STOP_WORDS else RARE

        return _WORD.sub(keep, text)


TERM_USERS_DDL = """
CREATE SCHEMA IF NOT EXISTS personas;
-- One row per (word, user): the first event day the user wrote the word (labelling/privacy.py); word '' marks
-- a user as covered from their first day. Derived from
-- marts.intent_memories; kept up to date for each day's active users, so counting public words needs no scan of
-- every memory text.
CREATE TABLE IF NOT EXISTS personas.term_users (
    word        VARCHAR NOT NULL,
    user_id     VARCHAR NOT NULL,
    first_date  DATE    NOT NULL
);
"""


def update_term_users(con, run_date: date, users: list[str]) -> int:
    """Recompute the ``personas.term_users`` rows of ``users`` from their memories up to the end of ``run_date``
    (a day's active users: everyone else's words did not change); returns the rows written."""
    import pyarrow as pa

    from persona_tasks.days import day_end
    from persona_tasks.warehouse import transaction

    con.execute(TERM_USERS_DDL)
    if not users:
        return 0
    t0 = time.perf_counter()
    first: dict[tuple[str, str], date] = {}
    reader = con.sql(
        "SELECT user_id, event_date, embedding_text FROM marts.intent_memories WHERE started_at < $e "
        "AND user_id IN (SELECT unnest($u)) ORDER BY user_id, event_date",
        params={"e": day_end(run_date), "u": list(users)}).to_arrow_reader(100_000)
    for batch in reader:
        for user, day, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(),
                                   batch.column(2).to_pylist()):
            first.setdefault(("", user), day)  # the user is covered from their first day (even without words)
            for w in set(words(text or "")):
                first.setdefault((w, user), day)  # rows come in event_date order: the first one is the earliest
    table = pa.table({"word": pa.array([w for w, _ in first], pa.string()),
                      "user_id": pa.array([u for _, u in first], pa.string()),
                      "first_date": pa.array(list(first.values()), pa.date32())})
    con.register("_term_users", table)
    con.register("_term_active", pa.table({"user_id": pa.array(list(users), pa.string())}))
    try:
        with transaction(con):
            con.execute("DELETE FROM personas.term_users WHERE user_id IN (SELECT user_id FROM _term_active)")
            con.execute("INSERT INTO personas.term_users SELECT word, user_id, first_date FROM _term_users")
    finally:
        con.unregister("_term_users")
        con.unregister("_term_active")
    log.info("term users: %d (word, user) pairs of %d active users in %.1fs", table.num_rows, len(users),
             time.perf_counter() - t0)
    return table.num_rows


def public_terms(con, run_date: date, k: int) -> PublicTerms:
    """``PublicTerms`` over every memory of the warehouse that started before the end of ``run_date``: from
    ``personas.term_users`` (kept by the daily runs: ``update_term_users``) when it covers every user with
    memories up to that day, else by reading every memory text."""
    from persona_tasks.days import day_end
    from persona_tasks.warehouse import table_exists

    if k <= 1:
        return PublicTerms(k=k, public=frozenset(), n_words=0)
    t0 = time.perf_counter()
    if table_exists(con, "term_users", "personas"):
        covered, users = con.execute(
            "SELECT (SELECT count(*) FROM personas.term_users WHERE word = '' AND first_date <= $d), "
            "(SELECT count(DISTINCT user_id) FROM marts.intent_memories WHERE started_at < $e)",
            {"d": run_date, "e": day_end(run_date)}).fetchall()[0]
        if covered == users:
            rows = con.execute("SELECT word, count(*) >= $k FROM personas.term_users WHERE first_date <= $d "
                               "AND word <> '' GROUP BY word", {"d": run_date, "k": k}).fetchall()
            terms = PublicTerms(k=k, public=frozenset(w for w, ok in rows if ok), n_words=len(rows))
            log.info("public terms (k=%d, personas.term_users): %d of %d distinct words public, in %.1fs", k,
                     len(terms.public), terms.n_words, time.perf_counter() - t0)
            return terms
    reader = con.sql(
        "SELECT DISTINCT user_id, embedding_text FROM marts.intent_memories WHERE started_at < $e ORDER BY user_id",
        params={"e": day_end(run_date)}).to_arrow_reader(100_000)

    def pairs():
        for batch in reader:
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())

    terms = PublicTerms.from_counts(users_per_word(pairs()), k)
    log.info("public terms (k=%d): %d of %d distinct words public, in %.1fs", k, len(terms.public), terms.n_words,
             time.perf_counter() - t0)
    return terms


def mask_clusters(clusters: list[ClusterInput], terms: PublicTerms | None) -> list[ClusterInput]:
    """The clusters with every non-public word of their texts replaced by ``[rare]`` (same ids, same order)."""
    if terms is None or terms.k <= 1:
        return clusters
    return [replace(c, memory_texts=[terms.mask(t) for t in c.memory_texts],
                    other_clusters_texts=None if c.other_clusters_texts is None else
                    [[terms.mask(t) for t in o] for o in c.other_clusters_texts])
            for c in clusters]
