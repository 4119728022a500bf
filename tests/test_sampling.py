"""The md5 samples (persona_tasks.sampling) that the evaluation, the LLM user cap, the global UMAP and topic fits and
the training split share: the same as DuckDB's ``ORDER BY md5(key)``, independent of the input order."""

import random

import duckdb

from persona_tasks.sampling import stable_sample, stable_sample_indices


def test_samples_follow_sql_md5_order_whatever_the_input_order():
    keys = [f"user-{i}" for i in range(200)] + ["ünïcode-ß", ""]
    con = duckdb.connect()
    sql_order = [r[0] for r in con.execute("SELECT k FROM unnest($keys) AS t(k) ORDER BY md5(k)",
                                           {"keys": keys}).fetchall()]
    shuffled = keys[:]
    random.Random(3).shuffle(shuffled)
    assert stable_sample(shuffled, None) == sql_order
    assert stable_sample(shuffled + shuffled[:50], 10) == sql_order[:10]  # duplicates count once
    idx = stable_sample_indices(shuffled, 25)
    assert [shuffled[i] for i in idx] == sql_order[:25]
    assert len(stable_sample_indices([], 5)) == 0 and stable_sample([], 3) == []
