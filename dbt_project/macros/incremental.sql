{#- Which event days an incremental build of a day-partitioned model must (re)build.

    A day is rebuilt when the number of distinct events it has in staging differs from the number of events the
    model holds for it (`count_column` summed). raw.events is append-only and event_id is a content hash, so a
    day's set of events only grows and "count changed" is exactly "events changed"; unlike a watermark on
    ingested_at this does not depend on clocks, on batch order or on the model having been built after every
    ingest, and it also repairs a day whose previous build was interrupted.

    Two steps keep a daily run cheap on a large warehouse:
      1. candidate days: raw row counts per day (one scan of raw.events.event_ts) that differ from the model;
      2. only for those days, distinct event counts from staging (its dedup window is pushed down to them).
    Step 2 matters only when raw holds duplicate rows (it should not: loaders skip known event_ids).

    Returns a list of 'YYYY-MM-DD' strings (empty: nothing to do). Not handled: days that lose all their events
    (raw is append-only; after an erasure run `persona-etl build --full-refresh`). -#}
{% macro changed_event_dates(count_column='n_actions') %}
    {%- if not execute or not is_incremental() -%}
        {{ return([]) }}
    {%- endif -%}
    {%- set candidates_sql -%}
        with raw_days as (
            select cast(event_ts as date) as event_date, count(*) as n_events
            from {{ source('raw', 'events') }}
            group by 1
        ),
        built_days as (
            select event_date, sum({{ count_column }}) as n_events
            from {{ this }}
            group by 1
        )
        select strftime(r.event_date, '%Y-%m-%d') as event_date
        from raw_days as r
        left join built_days as b using (event_date)
        where b.n_events is distinct from r.n_events
        order by 1
    {%- endset -%}
    {%- set candidates = run_query(candidates_sql).columns[0].values() | list -%}
    {%- if candidates | length == 0 -%}
        {{ return([]) }}
    {%- endif -%}
    {%- set changed_sql -%}
        with staged_days as (
            select event_date, count(*) as n_events
            from {{ ref('stg_events') }}
            where event_date in ({{ date_list(candidates) }})
            group by 1
        ),
        built_days as (
            select event_date, sum({{ count_column }}) as n_events
            from {{ this }}
            where event_date in ({{ date_list(candidates) }})
            group by 1
        )
        select strftime(s.event_date, '%Y-%m-%d') as event_date
        from staged_days as s
        left join built_days as b using (event_date)
        where b.n_events is distinct from s.n_events
        order by 1
    {%- endset -%}
    {%- set changed = run_query(changed_sql).columns[0].values() | list -%}
    {{ return(changed) }}
{% endmacro %}

{#- SQL list of DATE literals; `NULL` for an empty list so that `x in (NULL)` selects nothing. -#}
{% macro date_list(dates) -%}
    {%- if dates | length == 0 -%}
        null
    {%- else -%}
        {%- for d in dates -%}date '{{ d }}'{{ ", " if not loop.last }}{%- endfor -%}
    {%- endif -%}
{%- endmacro %}
