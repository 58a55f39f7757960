"""The infrastructure floor: Django plumbing every app may use — async database access,
middleware, API helpers, health probes, migration helpers. Nothing here imports an app."""
