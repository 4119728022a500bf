"""Loader for the Mercari MerRec dataset (``--format merrec``): its Parquet shards, as published.

MerRec (Li et al. 2024, huggingface.co/datasets/mercari-us/merrec) has one row per user action on an item:
``user_id``, ``sequence_id``, ``session_id``, ``item_id``, ``product_id``, ``name`` (item title), ``price``,
``c0_name``/``c1_name``/``c2_name`` (category levels, with ``c*_id``), ``brand_name``, ``item_condition_name``,
``size_name``, ``shipper_name``, ``color``, ``event_id`` (the action: item_view, item_like,
item_add_to_cart_tap, offer_make, buy_start, buy_comp) and ``stime`` (event time).

Required columns: user_id, item_id, name, event_id, stime; the others are copied into attributes when
present. ``stime`` may be a TIMESTAMP (taken as UTC), a TIMESTAMPTZ (converted), epoch seconds or ISO text.
A folder stands for its ``*.parquet`` shards (one batch each). Line = 1-based row number in the shard.

Mapping: event types item_view -> view, item_like -> like, item_add_to_cart_tap -> cart, offer_make -> offer,
buy_start -> checkout, buy_comp -> purchase (others are rejected as unknown); item_id = item_id, text = name,
attributes ``{"category": "c0 > c1 > c2", "brand", "price", "condition", "size", "color", "shipper",
"session_id", "sequence_id", "product_id", "merrec_event"}`` (those present). A row without item_id is rejected.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from persona_tasks.ingest.common import (
    Job,
    Stage,
    expand,
    nn,
    parquet_columns,
    parquet_scan,
    parquet_src,
    q,
    qi,
    require_columns,
    typed_ts_sql,
)

REQUIRED = ["user_id", "item_id", "name", "event_id", "stime"]
EVENT_TYPES = {
    "item_view": "view",
    "item_like": "like",
    "item_add_to_cart_tap": "cart",
    "offer_make": "offer",
    "buy_start": "checkout",
    "buy_comp": "purchase",
}
# attribute key -> MerRec column
ATTRIBUTES = {
    "brand": "brand_name",
    "price": "price",
    "condition": "item_condition_name",
    "size": "size_name",
    "color": "color",
    "shipper": "shipper_name",
    "session_id": "session_id",
    "sequence_id": "sequence_id",
    "product_id": "product_id",
}
WHAT = "MerRec"


class MerRecLoader:
    fmt = "merrec"

    def plan(self, paths: list[Path]) -> list[Job]:
        jobs = expand(paths, (".parquet",), "MerRec Parquet")
        for job in jobs:
            job.context["columns"] = cols = parquet_columns(job.path, job.display)
            require_columns(job.display, cols, REQUIRED, WHAT)
        return jobs

    def stage(self, con: duckdb.DuckDBPyConnection, job: Job) -> Stage:
        cols: dict[str, str] = job.context["columns"]

        def col(c: str) -> str:
            return f"t.{qi(c)}"

        def text(c: str) -> str:
            return nn(col(c)) if c in cols else "CAST(NULL AS VARCHAR)"

        levels = [text(c) for c in ("c0_name", "c1_name", "c2_name") if c in cols]
        category = f"nullif(concat_ws(' > ', {', '.join(levels)}), '')" if levels else "CAST(NULL AS VARCHAR)"
        attrs = [f"'category', {category}"]
        for key, c in ATTRIBUTES.items():
            if c in cols:
                value = col(c) if c == "price" else text(c)
                attrs.append(f"{q(key)}, {value}")
        attrs.append(f"'merrec_event', {text('event_id')}")
        et = text("event_id")
        mapped = "CASE " + et + " " + " ".join(f"WHEN {q(k)} THEN {q(v)}" for k, v in EVENT_TYPES.items()) \
            + f" ELSE {et} END"
        sql = f"""
            SELECT file_row_number + 1 AS line, {parquet_src(cols)} AS src,
                   CAST(NULL AS VARCHAR) AS pre_field, CAST(NULL AS VARCHAR) AS pre_reason,
                   {text('user_id')} AS user_id,
                   {text('stime')} AS ts_raw,
                   {typed_ts_sql(col('stime'), cols['stime'], None)} AS event_ts,
                   {mapped} AS event_type,
                   {text('item_id')} AS item_id,
                   {text('name')} AS text,
                   json_object({', '.join(attrs)}) AS attributes,
                   CASE WHEN {text('item_id')} IS NULL THEN 'item_id' END AS post_field,
                   CASE WHEN {text('item_id')} IS NULL THEN 'missing item id' END AS post_reason
            FROM {parquet_scan(job.path)}
        """
        return Stage(
            sql=sql,
            fields={"user_id": "user_id", "event_ts": "stime", "event_type": "event_id"},
            raw_record="to_json(src)",
            materialize=False,
        )
