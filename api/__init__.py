"""The HTTP API: thin FastAPI adapters over the submission and fetch services. No torch here."""
