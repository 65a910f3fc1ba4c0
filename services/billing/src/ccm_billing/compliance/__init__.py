"""Compliance records of the billing service: consent tracker, time logs filed per billing period,
audit packets (FHIR Bundle and PDF) for any patient and range of months.

Everything is assembled from billing's own projections and the evidence it keeps as it consumes
events (every source FHIR version, every filed decision, every care-plan review), so a packet
needs no call to another service.
"""
