"""CMS care-management rules: year-versioned data (``data/CY*.json``) + pure program modules.

A program (CCM today; PCM and APCM next) is a module exposing ``decide(facts, ruleset, options)``
registered in ``PROGRAMS``; its thresholds, caps, code sets and fees come from the ruleset data.
"""

from ccm_billing.domain.rules import ccm
from ccm_billing.domain.rules.ruleset import RuleSet, RulesetMissing, ruleset_for

PROGRAMS = {"CCM": ccm.decide}

__all__ = ["PROGRAMS", "RuleSet", "RulesetMissing", "ruleset_for", "ccm"]
