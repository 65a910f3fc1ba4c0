"""ccm-platform notification service. Provider directory, templated communications and acknowledgement tracking."""
