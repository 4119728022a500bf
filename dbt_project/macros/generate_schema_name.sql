{#- Schemas are exactly `staging`, `intermediate` and `marts` (the +schema of each folder), not dbt's default
    `<target schema>_<custom schema>`: the rest of persona-etl and analysts query those names directly. -#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {%- if custom_schema_name is none -%}
        {{ target.schema }}
    {%- else -%}
        {{ custom_schema_name | trim }}
    {%- endif -%}
{%- endmacro %}
