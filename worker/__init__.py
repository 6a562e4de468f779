"""The job queue: Celery app, tasks and the pipeline they run (infer → report → outbox)."""
