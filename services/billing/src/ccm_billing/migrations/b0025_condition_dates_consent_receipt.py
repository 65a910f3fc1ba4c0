"""billing: what a month's eligibility and consent are judged on, as of that month.

``conditions.chronic`` / ``onset`` / ``abatement`` / ``first_received_at`` / ``resolved_at`` /
``code_checked``: a chronic condition counts for the months from its onset (else when it was
first received) until its abatement (else until its resolution was received), not for every
month while it is active now (service_layer/conditions.py). Rows are filled from the condition
versions billing kept (``source_versions``), folded as the projection folds them; a row with
none (kept before billing_0003) is chronic when it counts now, with no dates (every month, as
before).

``consents.received_at``: when billing first received a version that granted the consent (the
earliest such ``source_versions.received_at``; NULL when none was kept): a month whose consent
was received after it ended is billed with the warning ``consent-documented-late``.

The downgrade drops the columns (the code before it reads none of them).

Revision ID: billing_0025
Revises: billing_0024
Create Date: 2026-11-30
"""

import json
from collections import defaultdict

import sqlalchemy as sa
from alembic import op

from ccm_billing.adapters.orm import CONDITION_DATE
from ccm_shared.migrate import column_names, migration_schema

revision = "billing_0025"
down_revision = "billing_0024"
branch_labels = None
depends_on = None

INSTANT = sa.DateTime(timezone=True)
CONDITION_COLUMNS = (("chronic", sa.Boolean()), ("onset", sa.String(CONDITION_DATE)),
                     ("abatement", sa.String(CONDITION_DATE)), ("first_received_at", INSTANT),
                     ("resolved_at", INSTANT), ("code_checked", sa.Boolean()))
GRANTING = ("ingest.consent.granted.v1", "ingest.consent.revoked.v1")


# billing_0002 creates the tables from today's model, which has the columns: added (and filled)
# only where they are missing.


def upgrade() -> None:
    schema = migration_schema()
    p, bind = f'"{schema}".', op.get_bind()
    if "received_at" not in column_names("consents"):
        op.add_column("consents", sa.Column("received_at", INSTANT, nullable=True), schema=schema)
        bind.execute(sa.text(
            f"UPDATE {p}consents SET received_at = (SELECT min(v.received_at) FROM "
            f"{p}source_versions v WHERE v.practice = consents.practice AND v.resource_type = "
            "'Consent' AND v.resource_id = consents.consent_id AND v.event_type IN "
            f"('{GRANTING[0]}', '{GRANTING[1]}'))"))
    have = column_names("conditions")
    added = [(name, kind) for name, kind in CONDITION_COLUMNS if name not in have]
    for name, kind in added:
        op.add_column("conditions", sa.Column(name, kind, nullable=True), schema=schema)
    if added:
        _fill_conditions(bind, p)


def _fill_conditions(bind, p: str) -> None:  # noqa: ANN001
    # Imported here: the fold is the projection's own (service_layer/conditions.py).
    from ccm_billing.service_layer.conditions import ACTIVE_CLINICAL, ConditionState, fold

    versions = defaultdict(list)
    for v in bind.execute(sa.text(
            f"SELECT practice, resource_id, version_id, last_updated, received_at, data FROM "
            f"{p}source_versions WHERE resource_type = 'Condition'")
            .columns(last_updated=INSTANT, received_at=INSTANT)).all():
        order = v.version_id.zfill(20) if v.version_id.isdigit() else v.version_id
        versions[(v.practice, v.resource_id)].append((v.last_updated, order, v))
    update = sa.text(
        f"UPDATE {p}conditions SET chronic = :chronic, onset = :onset, abatement = :abatement, "
        "first_received_at = :first_received_at, resolved_at = :resolved_at, "
        "code_checked = :code_checked WHERE practice = :practice AND condition_id = :condition_id"
    ).bindparams(sa.bindparam("first_received_at", type_=INSTANT),
                 sa.bindparam("resolved_at", type_=INSTANT))
    rows = bind.execute(sa.text(f"SELECT practice, condition_id, counts FROM {p}conditions")).all()
    for practice, condition_id, counts in rows:
        state, last = None, None
        for _, _, v in sorted(versions.get((practice, condition_id), ()), key=lambda x: x[:2]):
            last = json.loads(v.data)
            state = fold(state, last, v.received_at)
        if state is None:
            state = ConditionState(bool(counts), bool(counts), None, None, None, None, None)
        elif counts or (last.get("clinicalStatus") or "") in ACTIVE_CLINICAL:
            # Active now: the projection's verdict, which a re-mapping (not kept as a version
            # of its own) may have changed.
            state = ConditionState(**{**state.columns(), "chronic": bool(counts)})
        columns = state.columns()
        del columns["counts"]  # the projection's, kept as it is
        bind.execute(update, {**columns, "practice": practice, "condition_id": condition_id})


def downgrade() -> None:
    schema = migration_schema()
    if "received_at" in column_names("consents"):
        op.drop_column("consents", "received_at", schema=schema)
    have = column_names("conditions")
    for name, _ in CONDITION_COLUMNS:
        if name in have:
            op.drop_column("conditions", name, schema=schema)
