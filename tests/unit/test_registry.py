"""The model registry file (dreamq/registry.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamq.registry import ModelEntry, RegistryError, load_registry, write_registry


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "weights" / "demo").mkdir(parents=True)
    (tmp_path / "weights" / "photo.safetensors").write_bytes(b"")
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "ganyu.safetensors").write_bytes(b"")
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_relative_sources_resolve_against_the_registry_folder(
    folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Run from somewhere else: resolution must not depend on the working directory.
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    registry = load_registry(
        write(
            folder / "models.yaml",
            "models:\n"
            "  demo: {source: weights/demo}\n"
            "  photo: {source: ./weights/photo.safetensors, config: weights/demo}\n"
            "loras:\n"
            "  ganyu: {source: loras/ganyu.safetensors}\n",
        )
    )
    demo = folder / "weights" / "demo"
    assert registry.models["demo"].source == str(demo.resolve())
    assert registry.models["photo"].source == str((folder / "weights/photo.safetensors").resolve())
    assert registry.models["photo"].config == str(demo.resolve())
    assert registry.loras["ganyu"].source == str((folder / "loras/ganyu.safetensors").resolve())


def test_absolute_sources_and_hub_ids_are_kept(folder: Path) -> None:
    registry = load_registry(
        write(
            folder / "models.yaml",
            "models:\n"
            "  abs: {source: /srv/models/abs}\n"
            "  hub: {source: runwayml/stable-diffusion-v1-5}\n",
        )
    )
    assert registry.models["abs"].source == "/srv/models/abs"
    assert registry.models["hub"].source == "runwayml/stable-diffusion-v1-5"


def test_defaults(folder: Path) -> None:
    registry = load_registry(write(folder / "models.yaml", "models:\n  demo: {source: x}\n"))
    demo = registry.model("demo")
    assert demo is not None
    assert (demo.family, demo.kind, demo.config, demo.default_scheduler) == (
        "sd15",
        "image",
        None,
        None,
    )
    assert registry.loras == registry.embeddings == registry.vaes == {}
    assert registry.model("nope") is None


def test_explicit_values_are_kept(folder: Path) -> None:
    registry = load_registry(
        write(
            folder / "models.yaml",
            "models:\n"
            "  xl: {source: x, family: sdxl, kind: inpaint, default_scheduler: Euler a}\n"
            "embeddings:\n"
            "  neg: {source: e.pt, token: <neg>}\n",
        )
    )
    xl = registry.models["xl"]
    assert (xl.family, xl.kind, xl.default_scheduler) == ("sdxl", "inpaint", "Euler a")
    assert registry.embeddings["neg"].token == "<neg>"


@pytest.mark.parametrize(
    "text",
    [
        "models:\n  demo: {source: x, sorce: y}\n",  # unknown entry key
        "models:\n  demo: {source: x}\nloras:\n  l: {source: y, strength: 1}\n",
        "models:\n  demo: {source: x}\nschedulers: {}\n",  # unknown section
        "models:\n  demo: {source: x, family: sd3}\n",
        "models:\n  demo: {source: x, kind: audio}\n",
        "models:\n  demo: {family: sd15}\n",  # no source
        "loras: {}\n",  # no models
        "",
        "models: [a, b]\n",
        "- models\n",
        "models: {demo: {source: x}\n",  # broken YAML
    ],
)
def test_invalid_registries_raise_registry_error(folder: Path, text: str) -> None:
    with pytest.raises(RegistryError):
        load_registry(write(folder / "models.yaml", text))


def test_a_missing_file_raises_registry_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError):
        load_registry(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("source", "single"),
    [
        ("/m/photo.safetensors", True),
        ("/m/photo.ckpt", True),
        ("/m/diffusers-folder", False),
        ("runwayml/stable-diffusion-v1-5", False),
        ("/m/safetensors", False),
    ],
)
def test_is_single_file(source: str, single: bool) -> None:
    assert ModelEntry(source=source).is_single_file is single


def test_write_registry_round_trips(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    original = load_registry(
        write(
            folder / "models.yaml",
            "models:\n"
            "  demo: {source: weights/demo}\n"
            "  photo: {source: weights/photo.safetensors, config: weights/demo, family: sdxl}\n"
            "  hub: {source: runwayml/stable-diffusion-v1-5, kind: text2video}\n"
            "loras:\n"
            "  ganyu: {source: loras/ganyu.safetensors}\n"
            "embeddings:\n"
            "  neg: {source: /e/neg.pt, token: <neg>}\n",
        )
    )
    # Written to another folder: the sources are already resolved, so nothing moves.
    copy = tmp_path_factory.mktemp("copy") / "registry.yaml"
    write_registry(copy, original)
    assert load_registry(copy) == original
    assert "family: sd15" not in copy.read_text()  # defaults are left out
