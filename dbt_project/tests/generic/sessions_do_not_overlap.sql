{#- Sessions of one user never overlap: ordered by start, each session starts strictly after the previous one
    ended (touching counts as overlapping: equal timestamps belong to one session).

    Sessions are first collapsed from the tested model's rows (several memories of one session give one span),
    so the test reads a table of sessions, not events: on marts.intent_memories it sorts one row per session.
    Returns the offending pairs. -#}
{% test sessions_do_not_overlap(model, user_columns, session_column, start_column, end_column) %}
{%- set users = user_columns | join(', ') %}
with sessions as (
    select
        {{ users }},
        {{ session_column }} as session_key,
        min({{ start_column }}) as started_at,
        max({{ end_column }}) as ended_at
    from {{ model }}
    group by {{ users }}, {{ session_column }}
),
ordered as (
    select
        *,
        lag(session_key) over by_user as previous_session_key,
        lag(ended_at) over by_user as previous_ended_at
    from sessions
    window by_user as (partition by {{ users }} order by started_at, ended_at, session_key)
)
select {{ users }}, previous_session_key, session_key, previous_ended_at, started_at
from ordered
where previous_ended_at >= started_at
{% endtest %}
