"""The training service's SQL migrations (component ``training``), applied when the job store
opens (by the service and by every worker)."""
