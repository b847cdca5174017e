"""Dependency aliases: routes take services from app.state, so tests can build apps with fakes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.service import DreamboothService


async def _service(request: Request) -> DreamboothService:
    # async although it awaits nothing: FastAPI runs a plain `def` dependency in its thread
    # pool, a thread hop (and a wake-up of the event loop) on every request for one attribute.
    service: DreamboothService = request.app.state.service
    return service


Service = Annotated[DreamboothService, Depends(_service)]
