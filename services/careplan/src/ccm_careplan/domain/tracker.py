"""Pure decisions about one tracked care plan: what is scheduled, who is responsible."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo

SCHEDULED_STATUSES = frozenset({"active"})
CLOSED_STATUSES = frozenset({"revoked", "completed", "entered-in-error"})
CHRONIC_CLINICAL_STATUSES = frozenset({"active", "recurrence", "relapse"})
SIGNED_OUTCOMES = frozenset({"approved", "approved-with-changes"})
REVIEW_OUTCOMES = (*sorted(SIGNED_OUTCOMES), "declined")


@dataclass(frozen=True)
class Directory:
    """What the tracker knows of a practitioner or role: who it is and whether it is usable."""

    practitioner: str | None  # the Practitioner behind a PractitionerRole
    usable: bool  # active and not deleted


def is_scheduled(status: str, patient_usable: bool = True) -> bool:
    """Only active plans of living, active patients get reminders."""
    return status in SCHEDULED_STATUSES and patient_usable


def resolve_provider(
    author: str | None, general_practitioners: list[str], directory: dict[str, Directory]
) -> str | None:
    """The provider who must review: the plan's author, else the patient's first general
    practitioner; a PractitionerRole resolves to its Practitioner; unusable ones are passed over."""
    for candidate in [author, *general_practitioners]:
        if not candidate or not candidate.startswith(("Practitioner/", "PractitionerRole/")):
            continue
        known = directory.get(candidate)
        if known is not None and not known.usable:
            continue
        if candidate.startswith("PractitionerRole/") and known and known.practitioner:
            person = directory.get(known.practitioner)
            if person is None or person.usable:
                return known.practitioner
            continue
        return candidate
    return None


def is_chronic_active(data: dict) -> bool:
    """A Condition event that counts as an active chronic condition."""
    return (
        bool(data.get("chronic"))
        and not data.get("deleted")
        and (data.get("clinicalStatus") or "") in CHRONIC_CLINICAL_STATUSES
        and data.get("verificationStatus") != "entered-in-error"
    )


def parse_day(value: str | None) -> date | None:
    """A FHIR date or dateTime → its calendar date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def parse_instant(value: str) -> datetime:
    instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return instant if instant.tzinfo else instant.replace(tzinfo=UTC)


def local_day(instant: datetime, zone: tzinfo) -> date:
    """The calendar day of ``instant`` in ``zone``; the day it is written in when that one is
    off the calendar (the last hours of 9999-12-31 east of its offset, the first of 0001-01-01
    west of it), which raised OverflowError and dead-lettered the event."""
    try:
        return instant.astimezone(zone).date()
    except OverflowError:
        return instant.date()


def as_utc(instant: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; they were stored as UTC."""
    if instant is None:
        return None
    return instant if instant.tzinfo else instant.replace(tzinfo=UTC)


VersionOrder = tuple[datetime, str, int]


def mapping_revision(source: dict) -> int:
    """Ingest's ``source.mappingRevision``: set (1 and up) when it mapped the same stored version
    again after the practice's mapping configuration changed; absent counts as 0."""
    return int(source.get("mappingRevision") or 0)


def version_order(last_updated: datetime, version_id: str | None,
                  revision: int | None = 0) -> VersionOrder:
    """Where an event's source stands among one resource's events, in ingest's order:
    ``lastUpdated``, then ``versionId`` (ingest's are integers: compared as numbers, as billing's
    ``version_key`` does), then the mapping revision, so a re-mapping of a version is newer than
    what it re-states and older than any later version. A fact recorded before careplan_0004
    has no versionId (None): it sorts before every version of the same instant."""
    if version_id is None:
        vid = ""
    elif version_id.isascii() and version_id.isdigit():
        vid = version_id.zfill(20)
    else:
        vid = version_id
    return (as_utc(last_updated), vid, revision or 0)


def recipients(author: str | None, care_team: list[str]) -> list[str]:
    """Who receives a plan version: its care team and its author, once each, in order."""
    seen: dict[str, None] = {}
    for ref in [*care_team, author]:
        if ref:
            seen.setdefault(ref, None)
    return list(seen)
