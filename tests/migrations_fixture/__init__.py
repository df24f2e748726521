"""Migrations for the tests of services.mesh.migrations."""
