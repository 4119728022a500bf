{#- Every row satisfies a boolean SQL expression (a NULL result fails). Returns the offending rows. -#}
{% test expression_is_true(model, expression) %}
select *
from {{ model }}
where not coalesce(({{ expression }}), false)
{% endtest %}
