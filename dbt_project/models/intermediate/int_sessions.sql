{#- Sessionisation, at event grain: one row per staged event with the session it belongs to.

    Rule (docs/ARCHITECTURE.md): per user (source, user_id), events ordered by (event_ts, event_order_rank, event_id)
    (macro event_order: at equal timestamps a search comes before the clicks it led to); a new session
    starts at the user's first event of each UTC day and whenever the gap to the previous event is strictly longer
    than var('session_gap_minutes'). Cutting at midnight makes every event day self-contained, which is what lets
    marts.intent_memories rebuild single days incrementally and still equal a full refresh.

    Materialised as a view: its window is evaluated once, inside the build of intent_memories (the only
    consumer), and a filter on event_date is pushed below it. The gap to the previous event comes from
    stg_events.previous_event_ts (its dedup window already orders each user's day). Session-level facts
    (session_id, session_started_at, ...) are computed only when a query asks for them. -#}

{%- set gap_us = (var('session_gap_minutes') | int) * 60 * 1000000 %}

with events as (

    select
        event_id,
        source,
        user_id,
        event_date,
        event_ts,
        event_order_rank,
        event_type,
        action_text,
        content_text,
        -- the user's previous distinct event that day (stg_events computes it in its dedup window)
        epoch_us(event_ts) - epoch_us(previous_event_ts) as gap_us
    from {{ ref('stg_events') }}

),

flagged as (

    select
        *,
        -- first event of the user's day, or a gap strictly longer than the threshold
        coalesce(gap_us > {{ gap_us }}, true) as is_session_start
    from events

),

numbered as (

    select
        *,
        sum(cast(is_session_start as integer)) over user_day_so_far as session_index,
        row_number() over user_day_so_far as event_seq,
        max(case when is_session_start then event_ts end) over user_day_so_far as session_started_at
    from flagged
    window user_day_so_far as (
        partition by source, user_id, event_date
        order by {{ event_order() }}
        rows between unbounded preceding and current row
    )

)

select
    event_id,
    {{ session_id('source', 'user_id', 'session_started_at') }} as session_id,
    source,
    user_id,
    event_date,
    session_index,
    event_seq,
    event_ts,
    event_type,
    action_text,
    content_text,
    gap_us / 1e6 as seconds_since_previous_event,
    is_session_start,
    session_started_at
from numbered
