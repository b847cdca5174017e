"""The model registry: a YAML file naming the models, adapters and helper models served.

```yaml
models:
  demo: {source: /abs/path/to/diffusers-folder}          # from_pretrained
  photo: {source: /models/photo.safetensors, config: /models/sd15-config}  # from_single_file
  xl: {source: /models/sdxl, family: sdxl}
  fill: {source: /models/sd15-inpainting, kind: inpaint}  # a 9-channel inpainting UNet
  clip: {source: /models/text-to-video, kind: text2video}
loras:           # id -> {source, family}: a LoRA folder or .safetensors file
  detail: {source: /loras/more_details.safetensors}
embeddings:      # id -> {source, token, family}: textual inversion
  easyneg: {source: /embeddings/easynegative.safetensors, token: easynegative}
vaes:            # id -> {source, family}: an AutoencoderKL folder or file
  mse: {source: /vaes/sd-vae-ft-mse}
# Optional helper models; a request field that needs a missing one is refused by name.
safety_checker: {source: /models/stable-diffusion-safety-checker}   # safety_checker
upscaler: {source: /models/stable-diffusion-x4-upscaler}            # upscale
translator: {source: /models/opus-mt-mul-en}                        # multi_lingual
```

Relative sources resolve against the registry file's folder. Both the API (which ids exist) and the
workers (where the weights are) read it; neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ModelFamily = Literal["sd15", "sdxl"]
ModelKind = Literal["image", "inpaint", "text2video"]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="A local diffusers folder, a .safetensors file, or a hub id.")


class ModelEntry(_Entry):
    family: ModelFamily = "sd15"
    kind: ModelKind = Field(
        "image",
        description="image: text2img/img2img/inpaint on a 4-channel UNet; inpaint: a 9-channel "
        "inpainting checkpoint; text2video: a text-to-video UNet.",
    )
    config: str | None = Field(
        None,
        description="For a single .safetensors file: a diffusers folder (or hub id) giving the "
        "architecture. Required offline.",
    )
    default_scheduler: str | None = Field(
        None, description="Scheduler used when a request names none (else the model's own)."
    )

    @property
    def is_single_file(self) -> bool:
        return self.source.endswith((".safetensors", ".ckpt"))


class LoraEntry(_Entry):
    family: ModelFamily = "sd15"


class EmbeddingEntry(_Entry):
    family: ModelFamily = "sd15"
    token: str | None = None


class VaeEntry(_Entry):
    family: ModelFamily = "sd15"


class HelperEntry(_Entry):
    """A helper model: safety checker (a CLIP safety checker folder with its preprocessor),
    upscaler (a StableDiffusionUpscalePipeline folder, x4) or translator (a transformers
    sequence-to-sequence translation model into English)."""


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelEntry]
    loras: dict[str, LoraEntry] = Field(default_factory=dict)
    embeddings: dict[str, EmbeddingEntry] = Field(default_factory=dict)
    vaes: dict[str, VaeEntry] = Field(default_factory=dict)
    safety_checker: HelperEntry | None = None
    upscaler: HelperEntry | None = None
    translator: HelperEntry | None = None

    def model(self, model_id: str) -> ModelEntry | None:
        return self.models.get(model_id)


HELPERS = ("safety_checker", "upscaler", "translator")


class RegistryError(ValueError):
    pass


def _resolve(source: str, base: Path) -> str:
    path = Path(source).expanduser()
    if path.is_absolute() or not (base / path).exists():
        return str(path) if path.is_absolute() else source
    return str((base / path).resolve())


def load_registry(path: Path) -> Registry:
    """Read and validate the registry, resolving relative sources against its folder."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"cannot read model registry {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"invalid model registry {path}: the top level must be a mapping")
    base = path.parent
    entries: list[Any] = [data.get(helper) for helper in HELPERS]
    for section in ("models", "loras", "embeddings", "vaes"):
        # A section that is not a mapping is left for validation to report.
        if isinstance(data.get(section), dict):
            entries += data[section].values()
    for entry in entries:
        if isinstance(entry, dict):
            for name in ("source", "config"):
                if isinstance(entry.get(name), str):
                    entry[name] = _resolve(entry[name], base)
    try:
        return Registry.model_validate(data)
    except ValidationError as exc:
        raise RegistryError(f"invalid model registry {path}: {exc}") from exc


def write_registry(path: Path, registry: Registry) -> None:
    path.write_text(yaml.safe_dump(registry.model_dump(exclude_defaults=True), sort_keys=False))
