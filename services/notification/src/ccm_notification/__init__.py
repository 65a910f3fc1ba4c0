"""ccm-platform notification service: provider directory, templated communications,
acknowledgement tracking and practice-system subscriptions."""
