"""ccm-platform careplan service. Master tracker of care-plan reviews, reminders and escalation to clinical supervisors."""
