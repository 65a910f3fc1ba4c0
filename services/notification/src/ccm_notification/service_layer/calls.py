"""Call scheduling: a call request with proposed slots; the chosen slot is confirmed to both
sides with an iCalendar invitation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from icalendar import Calendar, Event, vCalAddress, vText
from sqlalchemy import select, update

from ccm_notification.adapters.orm import call_requests
from ccm_notification.domain.directory import display_name
from ccm_notification.service_layer.directory import load_provider
from ccm_notification.service_layer.notify import Intent, Notifier
from ccm_shared.db import UnitOfWork
from ccm_shared.errors import Conflict, InvalidInput, NotFound

# How far ahead a call may be proposed. Beyond it a slot is a mistake, and near datetime's end
# (year 9999) its end time or its UTC form cannot even be represented.
SLOT_HORIZON = timedelta(days=366)


def check_slots(slots: list[datetime], now: datetime) -> None:
    """Every proposed slot is in the future and within ``SLOT_HORIZON`` of ``now``."""
    if any(s <= now for s in slots):
        raise InvalidInput("every proposed slot must be in the future")
    latest = now + SLOT_HORIZON
    # Compared as aware datetimes, before anything converts them (which could overflow).
    if any(s > latest for s in slots):
        raise InvalidInput(
            f"every proposed slot must be within {SLOT_HORIZON.days} days "
            f"(before {latest.isoformat()})"
        )


def slot_label(start: datetime) -> str:
    return start.astimezone(UTC).strftime("%a %d %b %Y %H:%M UTC")


async def request_call(
    uow: UnitOfWork,
    notifier: Notifier,
    practice: str,
    *,
    provider_id: str,
    slots: list[datetime],
    duration_minutes: int,
    reason: str,
    requester_name: str,
    requester_email: str,
    patient: str | None,
) -> dict:
    if await load_provider(uow, practice, provider_id) is None:
        raise InvalidInput(f"provider {provider_id!r} is not in the directory")
    now = notifier.clock()
    check_slots(slots, now)
    call_id = str(uuid.uuid4())
    starts = sorted(s.astimezone(UTC) for s in slots)
    await uow.session.execute(
        call_requests.insert().values(
            id=call_id,
            practice=practice,
            provider_id=provider_id,
            patient=patient,
            reason=reason,
            requester_name=requester_name,
            requester_email=requester_email,
            slots=[s.isoformat() for s in starts],
            duration_minutes=duration_minutes,
            status="proposed",
            created_at=now,
        )
    )
    recorded = await notifier.notify(
        uow,
        Intent(
            practice=practice,
            kind="call-request",
            provider_id=provider_id,
            patient=patient,
            idempotency_key=f"{practice}:call:{call_id}:request",
            values={
                "reason": reason,
                "requester_name": requester_name,
                "patient": patient,
                "slots": [
                    {"label": slot_label(s), "link": notifier.slot_url(practice, call_id, i)}
                    for i, s in enumerate(starts)
                ],
            },
        ),
        strict=True,
    )
    return {
        "id": call_id,
        "status": "proposed",
        "slots": [s.isoformat() for s in starts],
        "message": recorded.message_id,
    }


def invitation(
    call, start: datetime, provider_name: str, provider_email: str | None, organizer_email: str
) -> str:  # noqa: ANN001
    """The .ics: a METHOD:REQUEST VEVENT the same for both sides (same UID)."""
    cal = Calendar()
    cal.add("prodid", "-//ccm-platform//notification//EN")
    cal.add("version", "2.0")
    cal.add("method", "REQUEST")
    event = Event()
    event.add("uid", f"call-{call.id}@ccm-platform")
    event.add("dtstamp", start)
    event.add("dtstart", start)
    event.add("dtend", start + timedelta(minutes=call.duration_minutes))
    event.add("summary", "CCM provider call")
    event.add("description", call.reason)
    organizer = vCalAddress(f"mailto:{organizer_email}")
    organizer.params["cn"] = vText(call.requester_name)
    event["organizer"] = organizer
    if provider_email:
        attendee = vCalAddress(f"mailto:{provider_email}")
        attendee.params["cn"] = vText(provider_name)
        attendee.params["role"] = vText("REQ-PARTICIPANT")
        event.add("attendee", attendee, encode=0)
    cal.add_component(event)
    return cal.to_ical().decode()


async def confirm_call(
    uow: UnitOfWork,
    notifier: Notifier,
    practice: str,
    call_id: str,
    slot: int,
) -> dict:
    """Confirm a slot (idempotent for the same slot; another slot after confirmation is 409)."""
    call = (
        await uow.session.execute(
            select(call_requests).where(
                call_requests.c.practice == practice, call_requests.c.id == call_id
            )
        )
    ).first()
    if call is None:
        raise NotFound(f"call request {call_id} not found")
    if not 0 <= slot < len(call.slots):
        raise InvalidInput(f"slot must be between 0 and {len(call.slots) - 1}")
    start = datetime.fromisoformat(call.slots[slot])
    if call.status == "confirmed":
        return _confirmed_view(call, call.chosen_slot, start)
    try:
        end = start + timedelta(minutes=call.duration_minutes)
    except OverflowError:  # a slot stored before slots were bounded (SLOT_HORIZON)
        raise InvalidInput("this slot's end time cannot be represented") from None
    # Conditional: of concurrent confirmations exactly one sets the slot; the others find it
    # set (PostgreSQL re-checks the condition once the winner commits; SQLite has one writer).
    won = await uow.session.execute(
        update(call_requests)
        .where(
            call_requests.c.practice == practice,
            call_requests.c.id == call_id,
            call_requests.c.chosen_slot.is_(None),
        )
        .values(status="confirmed", chosen_slot=start)
    )
    if won.rowcount != 1:
        chosen = (
            await uow.session.execute(
                select(call_requests.c.chosen_slot).where(call_requests.c.id == call_id)
            )
        ).scalar()
        return _confirmed_view(call, chosen, start)
    provider = await load_provider(uow, practice, call.provider_id)
    current = provider.current if provider else {}
    name = display_name(current, call.provider_id)
    ics = {
        "filename": "invite.ics",
        "content_type": "text/calendar",
        "content": invitation(call, start, name, current.get("email"), call.requester_email),
    }
    values = {
        "reason": call.reason,
        "start": slot_label(start),
        "end": slot_label(end),
        "patient": call.patient,
    }
    await notifier.notify(
        uow,
        Intent(
            practice=practice,
            kind="call-confirmed",
            provider_id=call.provider_id,
            patient=call.patient,
            values=values | {"with_name": call.requester_name},
            attachments=(ics,),
            idempotency_key=f"{practice}:call:{call_id}:confirmed:provider",
        ),
    )
    await notifier.notify(
        uow,
        Intent(
            practice=practice,
            kind="call-confirmed",
            patient=call.patient,
            address=("email", call.requester_email, call.requester_name),
            values=values | {"with_name": name},
            attachments=(ics,),
            idempotency_key=f"{practice}:call:{call_id}:confirmed:requester",
        ),
    )
    return _call_view(call, start, status="confirmed")


def _confirmed_view(call, chosen: datetime | None, start: datetime) -> dict:  # noqa: ANN001
    """A call already confirmed: the same slot again is idempotent, another one a conflict."""
    if chosen is not None and chosen.astimezone(UTC) == start:
        return _call_view(call, start, status="confirmed")
    raise Conflict("this call is already confirmed for another time")


def _call_view(call, start: datetime, status: str | None = None) -> dict:  # noqa: ANN001
    return {
        "id": call.id,
        "status": status or call.status,
        "chosen_slot": start.isoformat(),
        "provider": call.provider_id,
        "slots": call.slots,
    }
