{#- Every value of the column is a contract event type: one of var('event_types'), which persona_tasks.dbt_runner
    sets from settings.ingest.event_types (default in dbt_project.yml, kept equal to config.py's default).
    is_list: the column is a list of event types (intent_memories.event_types). Returns one row per offending
    value with its count. -#}
{% test accepted_event_types(model, column_name, is_list=false) %}
{%- set accepted = var('event_types') %}
with observed as (
    {%- if is_list %}
    select unnest({{ column_name }}) as event_type from {{ model }}
    {%- else %}
    select {{ column_name }} as event_type from {{ model }}
    {%- endif %}
)
select event_type, count(*) as n_rows
from observed
where event_type is null
   or event_type not in ({% for t in accepted %}'{{ t }}'{{ ", " if not loop.last }}{% endfor %})
group by event_type
{% endtest %}
