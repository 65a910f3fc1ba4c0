"""ccm-platform billing service. CMS care-management billing: monthly worklists, threshold alerts, invoices, payments."""
