"""The gateway's SQL migrations (component ``gateway``): API keys and usage counters, applied
by ``services.mesh.migrations.apply_migrations`` when the key store opens."""
