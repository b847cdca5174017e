"""Shared state: job records and their state machine in Redis, API keys, statistics, outputs."""
