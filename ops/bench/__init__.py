"""dreamq's benchmark suite.

    .venv/bin/python -m ops.bench [--quick] [--write docs/performance.md]

Starts its own redis-server, API, workers and reference servers on free loopback ports, measures
each figure beside its reference in the same run, and prints one table (docs/performance.md).
"""
