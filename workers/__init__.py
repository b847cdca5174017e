"""The worker side of dreamq: model loading, pipelines and the Celery job runner (imports torch)."""
