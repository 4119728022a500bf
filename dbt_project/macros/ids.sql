{#- Stable identifiers. Both are md5 hex digests of fields joined with the unit separator (chr(31)), like
    raw.events.event_id, so they are identical on incremental and full-refresh builds of the same events. -#}

{#- A session is identified by its user (source, user_id) and the timestamp of its first event: two sessions of a
    user cannot start at the same instant (a new session needs a gap > 0 or a new day). -#}
{% macro session_id(source, user_id, started_at) -%}
    md5(concat_ws(chr(31), 'session', {{ source }}, {{ user_id }}, strftime({{ started_at }}, '%Y-%m-%dT%H:%M:%S.%f')))
{%- endmacro %}

{#- A memory is identified by its session and its 1-based ordinal within the session (always 1 in v1: one memory per
    session; the ordinal keeps ids stable if a later rule splits sessions into several memories). -#}
{% macro memory_id(session_id, ordinal) -%}
    md5(concat_ws(chr(31), 'memory', {{ session_id }}, cast({{ ordinal }} as varchar)))
{%- endmacro %}
