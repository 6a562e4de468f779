"""Deployment files: example settings, service units."""
