"""The targets of reliability R16, shared by the outbound-guard tests, and the test doubles that
show a check happened at connect time: scripted resolvers and a refusing `create_connection`."""

from __future__ import annotations

import socket

import pytest

R16_ADDRESS_URLS = [
    "http://127.0.0.1/",
    "http://127.1/",
    "http://0x7f000001/",
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.0.1/",
    "http://100.64.0.1/",
    "http://100.100.100.200/",
    "http://0.0.0.0/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:a9fe:a9fe::1]/",
]
"""Every address of R16, in the forms a client may write it."""
R16_NAME_URLS = ["http://metadata.google.internal/computeMetadata/v1/"]
R16_SCHEME_URLS = ["file:///etc/passwd", "gopher://127.0.0.1:70/_x", "ftp://example.com/a.png"]
R16_ADDRESSES = [
    "127.0.0.1",
    "::1",
    "::ffff:127.0.0.1",
    "169.254.169.254",
    "fd00:ec2::254",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.0.1",
    "100.64.0.1",
    "100.100.100.200",
    "0.0.0.0",
    "64:ff9b::a9fe:a9fe",
    "2002:a9fe:a9fe::1",
]
"""What a host name may resolve to, for the connect-time check (a resolver answers canonical
text: `127.1` and friends arrive as 127.0.0.1)."""


class Answers:
    """A resolver answering from a script, one entry per call; the last entry repeats."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


def refuse_connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every connection attempt httpcore makes from now on, refused and recorded."""
    attempts: list[object] = []

    def refuse(address: object, *args: object, **kwargs: object) -> socket.socket:
        attempts.append(address)
        raise ConnectionRefusedError("a connection attempt in a test that must make none")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts
