"""Composition root of the billing service (the `ccm.services` entry point)."""

from ccm_billing.adapters.orm import metadata
from ccm_billing.compliance.http import build_compliance_router
from ccm_billing.entrypoints import outcomes
from ccm_billing.entrypoints.cli import app as cli
from ccm_billing.entrypoints.consumers import consumers
from ccm_billing.entrypoints.http import build_router
from ccm_billing.entrypoints.jobs import background
from ccm_billing.entrypoints.payment_corrections import build_payment_corrections_router
from ccm_billing.settings import BillingSettings
from ccm_shared.service import ServiceDefinition

PRODUCES = (
    "billing.threshold.at-risk.v1",
    "billing.period.closed.v1",
    "billing.invoice.issued.v1",
    "billing.invoice.cancelled.v1",
    "billing.invoice.paid.v1",
    "billing.invoice.overdue.v1",
    "billing.payment.recorded.v1",
    "billing.payment.voided.v1",
    "billing.payment.refunded.v1",
)


def _configure_app(app, runtime) -> None:  # noqa: ANN001
    outcomes.install(app)  # every error under /fhir an OperationOutcome


SERVICE = ServiceDefinition(
    name="billing",
    port=8082,
    description="CMS care-management billing: monthly worklists, threshold alerts, invoices, payments.",
    metadata=metadata,
    migrations_package="ccm_billing.migrations",
    routers=lambda runtime: [build_router(runtime), build_payment_corrections_router(runtime),
                             build_compliance_router(runtime)],
    consumers=consumers,
    background=background,
    configure_app=_configure_app,
    produces=PRODUCES,
    settings_model=BillingSettings,
    cli=cli,
)
