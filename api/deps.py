"""Dependency aliases: routes take services from app.state, so tests can build apps with fakes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.service import DreamboothService


def _service(request: Request) -> DreamboothService:
    service: DreamboothService = request.app.state.service
    return service


Service = Annotated[DreamboothService, Depends(_service)]
