"""The helper models, loaded from tiny random-weight folders through from_pretrained."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamq.errors import PublicJobError
from dreamq.jobparams import SAFETY_ACTIONS, SafetyAction
from dreamq.registry import HelperEntry, Registry
from workers.helpers import HelperModels, SafetyChecker, replace_flagged
from workers.tiny import write_tiny_safety_checker, write_tiny_translator, write_tiny_upscaler


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("helpers")
    return {
        "flag_all": write_tiny_safety_checker(root / "flag-all", flag_everything=True),
        "flag_none": write_tiny_safety_checker(root / "flag-none"),
        "upscaler": write_tiny_upscaler(root / "upscaler"),
        "translator": write_tiny_translator(root / "translator"),
    }


@pytest.fixture(scope="module")
def helpers(folders: dict[str, Path]) -> HelperModels:
    registry = Registry(
        models={},
        safety_checker=HelperEntry(source=str(folders["flag_all"])),
        upscaler=HelperEntry(source=str(folders["upscaler"])),
        translator=HelperEntry(source=str(folders["translator"])),
    )
    return HelperModels(registry, device="cpu", dtype="float32", upscale_steps=2)


def noise(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --- safety checker ---------------------------------------------------------------------------


@pytest.mark.parametrize("action", SAFETY_ACTIONS)
def test_flagged_images_are_replaced(helpers: HelperModels, action: SafetyAction) -> None:
    images = [noise(seed=1), noise(80, 40, seed=2)]
    out, flagged = helpers.safety_checker().apply(images, action)
    assert flagged == [True, True]
    for before, after in zip(images, out, strict=True):
        assert (after.size, after.mode) == (before.size, before.mode)
        assert not np.array_equal(pixels(after), pixels(before))
        if action == "black":
            assert not pixels(after).any()
        else:
            assert pixels(after).any()


def test_blur_and_pixelate_keep_the_colours_but_lose_the_detail() -> None:
    image = noise(128, 128, seed=3)
    before = pixels(image)
    for action in ("blur", "pixelate"):
        after = pixels(replace_flagged(image, action))
        # Noise averages out: far less difference between neighbours than in the input ...
        detail_before = np.abs(np.diff(before, axis=1)).mean()
        assert np.abs(np.diff(after, axis=1)).mean() < detail_before / 4
        # ... while the mean colour stays.
        assert abs(after.mean() - before.mean()) < 8
    blocks = pixels(replace_flagged(image, "pixelate"))
    assert np.array_equal(blocks[:8, :8], np.broadcast_to(blocks[0, 0], (8, 8, 3)))


def test_sensitive_content_card_draws_text() -> None:
    card = pixels(replace_flagged(noise(256, 256), "sensitive_content_text"))
    background = card[0, 0]
    text = np.any(card != background, axis=-1)
    assert text.any()  # the words
    assert not text[:64].any() and not text[-64:].any()  # centred, not spread over the image


def test_unflagged_images_pass_unchanged(folders: dict[str, Path]) -> None:
    checker = SafetyChecker(HelperEntry(source=str(folders["flag_none"])), "cpu", torch.float32)
    images = [noise(seed=4), noise(seed=5)]
    out, flagged = checker.apply(images, "black")
    assert flagged == [False, False]
    assert all(a is b for a, b in zip(out, images, strict=True))
    assert checker.apply([], "blur") == ([], [])


# --- upscaler ---------------------------------------------------------------------------------


def test_upscale_factors_give_the_sizes_and_repeat_for_a_seed(helpers: HelperModels) -> None:
    upscaler = helpers.upscaler()
    image = noise(16, 24, seed=6)
    sizes = {}
    for factor in (2, 3, 4):
        [result] = upscaler.upscale([image], factor=factor, prompt="a house", seed=7)
        sizes[factor] = result.size
    assert sizes == {2: (32, 48), 3: (48, 72), 4: (64, 96)}
    first = upscaler.upscale([image, image], factor=4, prompt="a house", seed=7)
    again = upscaler.upscale([image], factor=4, prompt="a house", seed=7)
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    # Image i is seeded seed + i, like samples.
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))
    assert upscaler.upscale([image], factor=1, prompt="", seed=0) == [image]
    with pytest.raises(PublicJobError, match="upscale factor 5"):
        upscaler.upscale([image], factor=5, prompt="", seed=0)


# --- translator -------------------------------------------------------------------------------


def test_translation_is_deterministic_and_not_empty(helpers: HelperModels) -> None:
    translator = helpers.translator()
    english = translator.translate("un chat sur la lune")
    assert english.strip()
    assert translator.translate("un chat sur la lune") == english
    assert translator.translate("   ") == "   "


# --- the cache --------------------------------------------------------------------------------


def test_helpers_load_once_across_threads(folders: dict[str, Path]) -> None:
    registry = Registry(models={}, translator=HelperEntry(source=str(folders["translator"])))
    helpers = HelperModels(registry, device="cpu")
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(helpers.translator())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(got) == 4 and all(helper is got[0] for helper in got)
    assert helpers.translator() is got[0]
    assert helpers.loaded_names() == ["translator"]


def test_missing_entries_are_refused_by_field() -> None:
    helpers = HelperModels(Registry(models={}), device="cpu")
    cases = [
        (helpers.safety_checker, "safety_checker", "safety_checker"),
        (helpers.upscaler, "upscale", "upscaler"),
        (helpers.translator, "multi_lingual", "translator"),
    ]
    for load, field, entry in cases:
        with pytest.raises(PublicJobError) as info:
            load()
        assert info.value.message == (
            f"The {field} option is not available on this server: its model registry has no "
            f"{entry} entry."
        )
    assert helpers.loaded_names() == []


def test_unloadable_entry_is_refused_by_field(tmp_path: Path) -> None:
    registry = Registry(models={}, upscaler=HelperEntry(source=str(tmp_path)))  # an empty folder
    with pytest.raises(PublicJobError) as info:
        HelperModels(registry, device="cpu").upscaler()
    assert info.value.message == (
        "The upscale option is not available on this server: its upscaler model could not be "
        "loaded."
    )
