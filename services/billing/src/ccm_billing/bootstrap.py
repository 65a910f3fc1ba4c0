"""Composition root of the billing service (the `ccm.services` entry point)."""

from ccm_shared.service import ServiceDefinition

from ccm_billing.adapters.orm import metadata

SERVICE = ServiceDefinition(
    name="billing",
    port=8082,
    description="CMS care-management billing: monthly worklists, threshold alerts, invoices, payments.",
    metadata=metadata,
    migrations_package="ccm_billing.migrations",
)
