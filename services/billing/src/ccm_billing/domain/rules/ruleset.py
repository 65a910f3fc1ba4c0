"""Year-versioned rule data: fee schedules, thresholds, caps and code sets (``data/CY<year>.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from functools import cache, cached_property
from importlib import resources

from ccm_billing.domain.model import Month


class RulesetMissing(Exception):
    """No rule data covers the requested year."""


@dataclass(frozen=True)
class Ladder:
    """A base code at a threshold plus an add-on per further full step, up to a cap."""

    base: str
    threshold_minutes: int
    add_on: str
    add_on_step_minutes: int
    add_on_cap: int | None

    def codes_for(self, seconds: int) -> dict[str, int]:
        """Codes for ``seconds`` of counted time (full minutes only: 1199 s is not 20 min)."""
        threshold = self.threshold_minutes * 60
        if seconds < threshold:
            return {}
        units = (seconds - threshold) // (self.add_on_step_minutes * 60)
        if self.add_on_cap is not None:
            units = min(units, self.add_on_cap)
        return {self.base: 1, self.add_on: units} if units else {self.base: 1}

    def next_step_seconds(self, seconds: int) -> tuple[str, int] | None:
        """The next code this ladder would add and the total seconds it needs; None at the cap."""
        threshold = self.threshold_minutes * 60
        if seconds < threshold:
            return self.base, threshold
        step = self.add_on_step_minutes * 60
        units = (seconds - threshold) // step
        if self.add_on_cap is not None and units >= self.add_on_cap:
            return None
        return self.add_on, threshold + (units + 1) * step

    def threshold_crossed(self, cumulative: list[tuple[int, object]], codes: dict[str, int]):
        """The point (from (running seconds, marker) pairs) where the last code's time was met."""
        if not codes:
            return None
        needed = self.threshold_minutes * 60 + codes.get(self.add_on, 0) * self.add_on_step_minutes * 60
        for running, marker in cumulative:
            if running >= needed:
                return marker
        return None


@dataclass(frozen=True)
class RuleSet:
    name: str
    year: int
    fees: dict[str, Decimal]
    fee_source: str
    programs: dict
    code_sets: dict

    def fee(self, code: str) -> Decimal:
        try:
            return self.fees[code]
        except KeyError:
            raise RulesetMissing(f"{self.name} has no fee for {code}") from None

    def amount(self, codes: dict[str, int]) -> Decimal:
        return sum((self.fee(c) * n for c, n in codes.items()), Decimal("0.00"))

    @cached_property
    def _ladders(self) -> dict[tuple[str, str], Ladder]:
        return {
            (program, path): Ladder(**spec)
            for program, paths in self.programs.items()
            for path, spec in paths.items()
            if isinstance(spec, dict) and "add_on" in spec
        }

    def ladder(self, program: str, path: str) -> Ladder:
        return self._ladders[(program, path)]

    def setting(self, program: str, key: str):  # noqa: ANN201 - JSON value
        return self.programs[program][key]


def _load(name: str) -> RuleSet:
    raw = json.loads(resources.files("ccm_billing.domain.rules.data").joinpath(f"{name}.json").read_text())
    return RuleSet(
        name=raw["ruleset"],
        year=raw["year"],
        fees={k: Decimal(v) for k, v in raw["fee_schedule"]["amounts"].items()},
        fee_source=raw["fee_schedule"]["source"],
        programs=raw["programs"],
        code_sets=raw["code_sets"],
    )


def available_years() -> list[int]:
    folder = resources.files("ccm_billing.domain.rules.data")
    return sorted(
        int(p.name[2:6]) for p in folder.iterdir() if p.name.startswith("CY") and p.name.endswith(".json")
    )


@cache
def ruleset_for(month: Month) -> RuleSet:
    """The ruleset of the month's calendar year; a later year without data uses the latest one."""
    years = available_years()
    if month.year < years[0]:
        raise RulesetMissing(f"no billing rules for {month.year} (earliest: CY{years[0]})")
    year = max(y for y in years if y <= month.year)
    return _load(f"CY{year}")
