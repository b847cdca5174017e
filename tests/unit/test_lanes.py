"""Priority lanes and fair sharing (dreamq/lanes.py)."""

from __future__ import annotations

import pytest

from dreamq import lanes


@pytest.mark.parametrize(
    ("lane", "unfinished", "fair_backlog", "level"),
    [
        ("high", 0, 4, 0),
        ("high", 4, 4, 1),  # a flooding high key competes with the normal keys' fresh work
        ("normal", 3, 4, 1),
        ("normal", 4, 4, 2),
        ("low", 0, 4, 2),
        ("low", 100, 4, 3),
        ("normal", 100, 0, 1),  # fair sharing off
    ],
)
def test_level(lane: lanes.Lane, unfinished: int, fair_backlog: int, level: int) -> None:
    assert lanes.level(lane, unfinished, fair_backlog) == level


def test_every_level_is_a_kombu_priority_list_of_the_queue() -> None:
    names = [lanes.list_name("generate", level) for level in range(lanes.LEVELS)]
    assert names == ["generate", "generate\x06\x163", "generate\x06\x166", "generate\x06\x169"]


def test_the_levels_are_kombus_default_priority_steps() -> None:
    from kombu.transport.redis import PRIORITY_STEPS

    assert list(lanes.BROKER_PRIORITIES) == list(PRIORITY_STEPS)
