{#- Text helpers for staging. All of them are plain SQL expressions (DuckDB, RE2 regular expressions), evaluated
    once per event before any window or sort, where string work is cheapest. -#}

{#- Trim and collapse every run of whitespace (spaces, tabs, newlines) to one space; empty -> NULL. -#}
{% macro normalise_text(expr) -%}
    nullif(trim(regexp_replace({{ expr }}, '\s+', ' ', 'g')), '')
{%- endmacro %}

{#- Mask personal data in free text, in this order:
      1. e-mail addresses                                   -> [email]
      2. phone numbers written with separators or brackets  -> [phone]
         (555-123-4567, (555) 123-4567, 555.123.4567, +1 555 123 4567, +44 20 7946 0958, 555-1234)
      3. any remaining run of 6 or more digits              -> [number]
         (account, card, order and unformatted phone numbers; years and short numbers are kept)
    The patterns are deliberately simple: they over-mask rather than leak, and they are documented in
    dbt_project/README.md and tested in tests/test_dbt_sessions.py. -#}
{% macro mask_pii(expr) -%}
    regexp_replace(
        regexp_replace(
            regexp_replace(
                {{ expr }},
                '[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}', '[email]', 'g'),
            '(\+\d{1,3}[ .-]?)?(\(\d{2,4}\) ?|\b\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}\b|\b\d{3}[.-]\d{4}\b', '[phone]', 'g'),
        '\d{6,}', '[number]', 'g')
{%- endmacro %}

{#- Host of a URL without scheme, credentials, port or a leading "www.", lower-cased: the readable part of a click. -#}
{% macro url_domain(expr) -%}
    nullif(regexp_extract(lower({{ expr }}), '^(?:[a-z][a-z0-9+.-]*://)?(?:[^/@?#]*@)?(?:www\d*\.)?([^/:?#]+)', 1), '')
{%- endmacro %}
