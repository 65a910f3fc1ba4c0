"""Consent standing: pure rules over consent versions (no framework imports).

A patient's standing for the tracker, and whether a consent was in force in a given month, by the
rules billing decides on: a revocation takes effect at the end of its month, a consent entered in
error never counted, a declined one (rejected, or provision deny) never counted. A renewal
interval (months; none by default) makes a consent expire that long after it was obtained.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Literal

from ccm_billing.domain.model import Month, add_months

State = Literal["active", "expiring", "expired", "missing", "declined", "revoked", "voided"]
ATTENTION: tuple[State, ...] = ("missing", "declined", "revoked", "voided", "expired", "expiring")
NOT_YET = ("draft", "proposed")


@dataclass(frozen=True)
class ConsentFact:
    """The newest version of one Consent, dates already in the practice's time zone."""

    consent_id: str
    status: str  # active | inactive | rejected | entered-in-error | proposed | draft
    provision: str  # permit | deny
    obtained_on: date | None
    effective_until: date | None = None  # revoked: last day of the month of revocation
    method: str = "unknown"  # written | verbal | unknown
    valid_from: date | None = None  # provision.period (None: open)
    valid_until: date | None = None


def _not_yet(c: ConsentFact) -> bool:
    """Draft or proposed and never granted (one granted and set back to draft or proposed is
    revoked: ingest gives it the end of its revocation month)."""
    return c.status in NOT_YET and c.effective_until is None


@dataclass(frozen=True)
class Standing:
    state: State
    consent: ConsentFact | None = None
    expires_on: date | None = None
    days_left: int | None = None


def expires_on(consent: ConsentFact, renewal_months: int | None) -> date | None:
    if not renewal_months or consent.obtained_on is None:
        return None
    return add_months(consent.obtained_on, renewal_months)


def _obtained(c: ConsentFact) -> date:
    return c.obtained_on or date.min


def standing(consents: list[ConsentFact], today: date, *, renewal_months: int | None = None,
             within_days: int = 30) -> Standing:
    """The patient's consent standing today: an active permit wins; else the newest other one."""
    usable = [c for c in consents if not _not_yet(c)]
    # Active and in force today: obtained by today and within its provision.period.
    active = [c for c in usable if c.status == "active" and c.provision == "permit"
              and (c.obtained_on is None or c.obtained_on <= today)
              and (c.valid_from is None or c.valid_from <= today)
              and (c.valid_until is None or c.valid_until >= today)]
    if active:
        # The one that lasts longest stands: billing bills under any consent still in force, so
        # one without an expiry (no date obtained, or no interval) keeps the patient active
        # whatever an older dated one says.
        lasting = [c for c in active if expires_on(c, renewal_months) is None]
        if lasting:
            return Standing("active", max(lasting, key=_obtained))
        newest = max(active, key=lambda c: (expires_on(c, renewal_months), _obtained(c)))
        until = expires_on(newest, renewal_months)
        assert until is not None
        left = (until - today).days
        state: State = "expired" if left <= 0 else "expiring" if left <= within_days else "active"
        return Standing(state, newest, until, left)
    if not usable:
        return Standing("missing")
    newest = max(usable, key=_obtained)
    if newest.status == "entered-in-error":
        return Standing("voided", newest)
    if newest.status == "rejected" or newest.provision == "deny":
        return Standing("declined", newest)
    if newest.status == "active":  # not in force today
        if newest.valid_until is not None and newest.valid_until < today:
            return Standing("expired", newest, newest.valid_until,
                            (newest.valid_until - today).days)
        return Standing("missing", newest)  # not yet: obtained or valid from a later day
    return Standing("revoked", newest, newest.effective_until,
                    (newest.effective_until - today).days if newest.effective_until else None)


def in_force(consent: ConsentFact, month: Month, *, renewal_months: int | None = None) -> tuple[bool, str]:
    """Whether the consent covered (part of) the month, and why in words an auditor reads."""
    if consent.status == "entered-in-error":
        return False, "voided (entered in error): never valid"
    if _not_yet(consent):
        return False, f"{consent.status}: not yet agreed"
    if consent.status == "rejected" or consent.provision == "deny":
        return False, "declined"
    # The same verdict as billing's (rules/ccm.py effective_consent), in words.
    if consent.obtained_on is not None and consent.obtained_on > month.last_day:
        return False, f"obtained later, on {consent.obtained_on}"
    until = expires_on(consent, renewal_months)
    # Expiring on the 1st, it covers no day of that month (rules/ccm.py valid_consents).
    if until is not None and until <= month.first_day:
        return False, f"expired on {until}"
    if consent.valid_from is not None and consent.valid_from > month.last_day:
        return False, f"valid from {consent.valid_from} (provision.period)"
    if consent.valid_until is not None and consent.valid_until < month.first_day:
        return False, f"its period ended on {consent.valid_until} (provision.period)"
    obtained = (f"obtained {consent.obtained_on}" if consent.obtained_on is not None
                else "date obtained not recorded")
    if consent.status != "active":  # inactive, or granted and set back to draft or proposed
        if consent.effective_until is None:
            return False, "revoked (the end of its effect is not known)"
        if consent.effective_until < month.first_day:
            return False, f"revoked; in force until {consent.effective_until}"
        return True, (f"{obtained} ({consent.method}); revoked, in force until "
                      f"{consent.effective_until}")
    note = f"{obtained} ({consent.method})"
    if until is not None and until <= month.last_day:
        note += f"; expires {until}"
    return True, note
