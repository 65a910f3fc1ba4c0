"""ccm-platform careplan service: master tracker of care-plan reviews, reminders and
escalation to clinical supervisors."""
