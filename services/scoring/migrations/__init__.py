"""The scoring service's SQL migrations (component ``scoring``), applied by
``services.mesh.migrations.apply_migrations`` when the prediction store opens."""
