"""Docs are part of the change: every setting is in the README table and the example env file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dreamq.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
VARIABLES = [f"DREAMQ_{name.upper()}" for name in Settings.model_fields]


@pytest.mark.parametrize("variable", VARIABLES)
def test_every_setting_is_documented(variable: str) -> None:
    assert f"`{variable}`" in (ROOT / "README.md").read_text()
    assert variable in (ROOT / "ops" / "dreamq.env.example").read_text()


def test_compose_names_the_services_and_settings_the_code_expects() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "minio", "api", "gpu-worker", "dispatcher"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    assert services["gpu-worker"]["command"][:2] == ["dreamq", "worker"]
    assert services["dispatcher"]["command"][:2] == ["dreamq", "dispatcher"]
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    for name in ("api", "gpu-worker", "dispatcher"):
        assert set(services[name]["environment"]) <= {
            *VARIABLES,
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        }
    # The API image installs the base distribution only: no torch, no diffusers.
    dockerfile = (ROOT / "ops" / "Dockerfile.api").read_text()
    assert "pip install --no-cache-dir . " in dockerfile
    assert "[worker]" not in dockerfile
