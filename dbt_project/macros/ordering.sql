{#- The order of a user's events (docs/ARCHITECTURE.md): (event_ts, event-type rank, event_id).

    At equal timestamps a search sorts before every other event type: the AOL log gives a query and the clicks it
    led to one timestamp, and event_id (a content hash) alone would put the click first about half the time.
    Other types share one rank, so among them event_id decides (deterministic, content-based).
    stg_events computes the rank once (column event_order_rank); every window or ordered aggregate over events
    orders by event_order(), so staging (dedup, previous event), int_sessions (session number, event_seq) and,
    through event_seq, intent_memories (memory_text, event_ids) agree. bench/bench_memories.py repeats the rule. -#}

{#- Rank of an event type in the tie-break: search = 0, any other type = 1. -#}
{% macro event_order_rank(event_type) -%}
    case when {{ event_type }} = 'search' then 0 else 1 end
{%- endmacro %}

{#- ORDER BY list for a user's events; needs the columns event_ts, event_order_rank and event_id. -#}
{% macro event_order(prefix='') -%}
    {{ prefix }}event_ts, {{ prefix }}event_order_rank, {{ prefix }}event_id
{%- endmacro %}
