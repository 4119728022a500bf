"""The one custom expectation of the gates, written with GX's extension API (a map metric provider and a
``MulticolumnMapExpectation``): no built-in expectation reconciles a count with the sum of its parts per row
(``ExpectMulticolumnSumToEqual`` compares a row's sum with one constant for every row).

``ExpectColumnToEqualSumOfColumns(column_list=[total, part_1, part_2, ...])``: each row's first column equals the
sum of the others (the ingest ledger: ``rows_read = rows_accepted + rows_rejected``). A row with a missing value
in any of them is unexpected (a missing count does not reconcile). Importing this module registers both classes.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import MulticolumnMapExpectation
from great_expectations.expectations.metrics.map_metric_provider import MulticolumnMapMetricProvider
from great_expectations.expectations.metrics.map_metric_provider.multicolumn_condition_partial import (
    multicolumn_condition_partial,
)

METRIC = "multicolumn_values.first_equals_sum_of_rest"


class MulticolumnFirstEqualsSumOfRest(MulticolumnMapMetricProvider):
    condition_metric_name = METRIC
    condition_domain_keys = ("batch_id", "table", "column_list", "row_condition", "condition_parser",
                             "ignore_row_if")
    condition_value_keys = ()

    @multicolumn_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column_list, **kwargs):
        total = column_list.iloc[:, 0]
        parts = column_list.iloc[:, 1:].sum(axis=1, skipna=False)
        return (total == parts).fillna(False)


class ExpectColumnToEqualSumOfColumns(MulticolumnMapExpectation):
    """Expect each row's first column of ``column_list`` to equal the sum of the remaining columns."""

    map_metric: ClassVar[str] = METRIC
    success_keys: ClassVar[tuple[str, ...]] = ("mostly",)
    args_keys: ClassVar[tuple[str, ...]] = ("column_list",)
    ignore_row_if: Literal["all_values_are_missing", "any_value_is_missing", "never"] = "never"

    library_metadata: ClassVar[dict] = {"maturity": "experimental", "tags": ["persona-etl", "reconciliation"],
                                        "contributors": ["persona-etl"]}
