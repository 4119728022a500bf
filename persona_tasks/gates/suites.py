"""The three gates' suites in the order the daily run meets them (raw day, intent memories, staged personas).

A module of its own, below the runner and the runbook that list every check, so that neither imports the package.
"""

from __future__ import annotations

from persona_tasks.gates.checks import Suite
from persona_tasks.gates.memories import SUITE as MEMORIES
from persona_tasks.gates.personas import SUITE as PERSONAS
from persona_tasks.gates.raw import SUITE as RAW

SUITES: tuple[Suite, ...] = (RAW, MEMORIES, PERSONAS)


def suite(gate: str) -> Suite:
    return next(s for s in SUITES if s.gate == gate)
