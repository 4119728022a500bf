{#- One row per intent memory: a compact, evidence-grounded account of what a user did in one session.

    v1 rule: one memory per session (no splitting of interleaved intents yet; memory_id already carries an
    ordinal so a later splitting rule keeps ids stable). Incremental by event day: a run rebuilds only the days
    whose events changed since the last build (macro changed_event_dates) with delete+insert on event_date;
    a full refresh gives the same rows, ids included.

    The aggregation collects each session's actions as one list of structs, in whatever order the hash aggregate
    saw them, and puts it in session order once: list_grade_up sorts the integer positions (the struct field seq)
    and list_select applies that permutation. Profiled with EXPLAIN ANALYZE (docs/performance.md), this is much
    cheaper in DuckDB than list_sort on the structs (its sort keys encode every string of the struct) and than
    several ordered aggregates (list(... order by ...)).
    The position is int_sessions.event_seq, i.e. the event order of macro event_order (event_ts, then a search
    before other types at equal timestamps, then event_id): memory_text, embedding_text and event_ids follow it.

    Two texts: memory_text is for people (every action with its verb: "searched: ...; clicked: site"); embedding_text
    is what gets embedded, clustered and labelled: only what the user meant (queries, item titles), each distinct part
    once. The template words and click domains that every memory_text shares pull all vectors together (about 10
    Hit@10 points on AOL, docs/results.md). -#}

{{ config(
    materialized='incremental',
    incremental_strategy='delete+insert',
    unique_key='event_date',
    on_schema_change='fail',
) }}

-- depends_on: {{ ref('stg_events') }}
-- depends_on: {{ source('raw', 'events') }}

{%- set max_chars = var('memory_text_max_chars') | int %}
{%- set days = changed_event_dates('n_actions') %}
{%- if is_incremental() and execute %}
    {{ log("intent_memories: " ~ (days | length) ~ " event day(s) to rebuild"
           ~ ((": " ~ days[0] ~ " .. " ~ days[-1]) if days else ""), info=True) }}
{%- endif %}

with events as (

    select
        source,
        user_id,
        event_date,
        session_index,
        event_seq,
        event_ts,
        event_id,
        event_type,
        action_text,
        content_text
    from {{ ref('int_sessions') }}
    {%- if is_incremental() %}
    where event_date in ({{ date_list(days) }})
    {%- endif %}

),

sessions as (

    select
        source,
        user_id,
        event_date,
        session_index,
        min(event_ts) as started_at,
        max(event_ts) as ended_at,
        count(*) as n_actions,
        list(struct_pack(
            seq := event_seq, event_id := event_id, event_type := event_type, action_text := action_text,
            content_text := content_text
        )) as actions
    from events
    group by source, user_id, event_date, session_index

),

ordered as (

    -- session order: the permutation that sorts the positions, applied to the session's actions
    select
        source,
        user_id,
        event_date,
        started_at,
        ended_at,
        n_actions,
        {{ session_id('source', 'user_id', 'started_at') }} as session_id,
        list_transform(actions, lambda a: a.event_id) as event_ids,
        list_transform(actions, lambda a: a.event_type) as types_in_order,
        list_transform(actions, lambda a: a.action_text) as parts,
        -- the content parts (stg_events.content_text: queries, titles; no template words, no clicked sites)
        list_filter(list_transform(actions, lambda a: a.content_text), lambda c: c is not null) as content_parts
    from (
        select * replace (list_select(actions, list_grade_up(list_transform(actions, lambda a: a.seq))) as actions)
        from sessions
    )

),

texts as (

    select
        *,
        -- consecutive identical parts are written once
        array_to_string(list_filter(parts, lambda p, i: i = 1 or p is distinct from parts[i - 1]), '; ')
            as full_text,
        -- each distinct content part once, in order of first occurrence
        array_to_string(list_filter(content_parts, lambda c, i: list_position(content_parts, c) = i), '; ')
            as content_joined
    from ordered

),

embedded as (

    select
        *,
        -- a session without any content part (only clicks, say) is embedded as its display text
        coalesce(nullif(content_joined, ''), full_text) as content_text
    from texts

)

select
    {{ memory_id('session_id', 1) }} as memory_id,
    user_id,
    session_id,
    event_date,
    started_at,
    ended_at,
    cast(n_actions as integer) as n_actions,
    -- distinct event types in order of first occurrence
    list_filter(types_in_order, lambda t, i: list_position(types_in_order, t) = i) as event_types,
    case
        when length(full_text) > {{ max_chars }} then left(full_text, {{ max_chars - 1 }}) || '…'
        else full_text
    end as memory_text,
    case
        when length(content_text) > {{ max_chars }} then left(content_text, {{ max_chars - 1 }}) || '…'
        else content_text
    end as embedding_text,
    event_ids,
    source
from embedded
