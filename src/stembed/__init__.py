"""stembed."""
