"""Audit trail: let the service roles write it.

Every service records audit entries (INSERT into ``platform.audit_log``, in its own requests'
and consumers' transactions) and its relay's audit sealer chains them (UPDATE of ``seq``,
``prev_hash`` and ``hash``, and an upsert into ``platform.audit_heads``). On a cluster where
each service has a login role of its own (Kubernetes: ``ccm_<svc>``, which may only read
``platform``) these were refused: consumers dead-lettered every audited event, the API lost
its entries.

Which roles: the platform's own (named ``ccm_…``, as ``deploy/tools/render.py`` names the
service roles) granted USAGE on schema ``platform`` (in the Cluster's ``postInitApplicationSQL``,
which runs before any migration), other than its owner, never ``PUBLIC``. A role an operator
gave USAGE on ``platform`` for reading (a report's, an auditor's: any other name) gets no write
of the tamper-evident trail. Where no role has it (a single database user, as
in development and Docker Compose) there is nothing to grant. SQLite has no roles.

Revision ID: p0004
Revises: p0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "p0004"
down_revision = "p0003"
branch_labels = None
depends_on = None

# The grantees: the platform's roles (ccm_…) with USAGE on schema platform, other than the owner
# and PUBLIC (0).
_ROLES = sa.text(
    "SELECT DISTINCT a.grantee::regrole::text AS role "
    "FROM pg_namespace n, aclexplode(n.nspacl) a "
    "WHERE n.nspname = 'platform' AND a.privilege_type = 'USAGE' "
    "AND a.grantee <> 0 AND a.grantee <> n.nspowner "
    "AND a.grantee::regrole::text LIKE 'ccm\\_%' ESCAPE '\\' ORDER BY 1"
)


def _statements(role: str, sequence: str | None) -> list[str]:
    out = [
        f"GRANT SELECT, INSERT ON platform.audit_log TO {role}",
        # The sealer sets only these; an entry's content stays as recorded.
        f"GRANT UPDATE (seq, prev_hash, hash) ON platform.audit_log TO {role}",
        f"GRANT SELECT, INSERT, UPDATE ON platform.audit_heads TO {role}",
    ]
    if sequence:
        out.append(f"GRANT USAGE ON SEQUENCE {sequence} TO {role}")
    return out


def _audit_sequence(bind: sa.Connection) -> str | None:
    """The sequence of ``platform.audit_log``'s ids (None where the id is no serial)."""
    return bind.execute(
        sa.text("SELECT pg_get_serial_sequence('platform.audit_log', 'id')")).scalar()


def audit_writer_roles(bind: sa.Connection) -> list[str]:
    return list(bind.execute(_ROLES).scalars())


def grant_audit_writes(bind: sa.Connection) -> list[str]:
    """Grant the audit trail's writes to the service roles; return the roles granted to."""
    if bind.dialect.name != "postgresql":
        return []
    sequence = _audit_sequence(bind)
    roles = audit_writer_roles(bind)
    for role in roles:
        for statement in _statements(role, sequence):
            bind.execute(sa.text(statement))
    return roles


def upgrade() -> None:
    grant_audit_writes(op.get_bind())


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    sequence = _audit_sequence(bind)
    for role in audit_writer_roles(bind):
        bind.execute(sa.text(f"REVOKE INSERT, UPDATE ON platform.audit_log FROM {role}"))
        bind.execute(sa.text(f"REVOKE INSERT, UPDATE ON platform.audit_heads FROM {role}"))
        if sequence:
            bind.execute(sa.text(f"REVOKE USAGE ON SEQUENCE {sequence} FROM {role}"))
