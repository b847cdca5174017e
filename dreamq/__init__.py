"""dreamq: a self-hosted backend for the Dreambooth API V4, as a distributed job queue."""

__version__ = "0.1.0"
