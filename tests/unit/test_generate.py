"""workers/generate.py: every job kind on the tiny demo models, through the PipelineCache a worker
uses (from_pretrained); seeding, sizes, progress, refusals, one load per model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamq.jobparams import JobParams
from dreamq.registry import Registry, load_registry
from tests.support.generation import params, pixels
from workers.generate import Generator, JobRefused
from workers.models import PipelineCache

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def demo(demo_registry_file: Path) -> Registry:
    return load_registry(demo_registry_file)


@pytest.fixture(scope="module")
def cache(demo: Registry) -> PipelineCache:
    return PipelineCache(demo, device="cpu")


@pytest.fixture(scope="module")
def generator(cache: PipelineCache, demo: Registry) -> Generator:
    return Generator(cache, demo)


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    # An odd size: the output is the init image's size rounded down to 8.
    pixels = np.random.default_rng(0).integers(0, 256, size=(37, 38, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mask(
    box: tuple[int, int, int, int] = (8, 8, 24, 24), size: tuple[int, int] = (38, 37)
) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def test_same_seed_same_image_and_seed_i_for_sample_i(generator: Generator) -> None:
    once = generator.run("demo", params(samples=2, seed=40))
    again = generator.run("demo", params(samples=2, seed=40))
    second = generator.run("demo", params(seed=41))
    assert [image.size for image in once.images] == [(32, 32), (32, 32)]
    assert (once.width, once.height) == (32, 32)
    assert once.pipeline_seconds > 0
    assert np.array_equal(pixels(once, 0), pixels(again, 0))
    assert not np.array_equal(pixels(once, 0), pixels(once, 1))
    # Batched convolutions add in another order than single ones: at most one grey level.
    assert np.abs(pixels(once, 1) - pixels(second)).max() <= 1


def test_one_load_serves_txt2img_img2img_and_inpaint(
    demo: Registry, init_image: Image.Image
) -> None:
    cache = PipelineCache(demo, device="cpu")
    generator = Generator(cache, demo)
    generator.run("demo", params())
    generator.run("demo", params("img2img"), init_image=init_image)
    generator.run("demo", params("inpaint"), init_image=init_image, mask_image=_mask())
    assert cache.stats.loads == 1
    loaded = cache.get("demo")
    assert set(loaded.variants) == {"img2img", "inpaint"}
    for variant in loaded.variants.values():
        assert variant.unet is loaded.pipe.unet
        assert variant.vae is loaded.pipe.vae
        assert variant.text_encoder is loaded.pipe.text_encoder


@pytest.mark.parametrize("model_id", ["demo", "demo-xl"])
def test_img2img_takes_its_size_from_the_init_image(
    generator: Generator, init_image: Image.Image, model_id: str
) -> None:
    result = generator.run(model_id, params("img2img"), init_image=init_image)
    assert (result.width, result.height) == (32, 32)
    assert result.images[0].size == (32, 32)
    sized = generator.run(model_id, params("img2img", width=24, height=40), init_image=init_image)
    assert sized.images[0].size == (24, 40)


def test_img2img_strength(generator: Generator, init_image: Image.Image) -> None:
    default = generator.run("demo", params("img2img", steps=4), init_image=init_image)
    explicit = generator.run(
        "demo", params("img2img", steps=4, strength=0.7), init_image=init_image
    )
    weak = generator.run("demo", params("img2img", steps=4, strength=0.25), init_image=init_image)
    assert np.array_equal(pixels(default), pixels(explicit))
    assert not np.array_equal(pixels(default), pixels(weak))
    other = init_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped = generator.run("demo", params("img2img", steps=4), init_image=other)
    assert not np.array_equal(pixels(default), pixels(flipped))


@pytest.mark.parametrize("model_id", ["demo", "demo-inpaint", "demo-xl"])
def test_inpaint_follows_the_mask(
    generator: Generator, init_image: Image.Image, model_id: str
) -> None:
    job = params("inpaint", steps=3)
    first = generator.run(model_id, job, init_image=init_image, mask_image=_mask())
    again = generator.run(model_id, job, init_image=init_image, mask_image=_mask())
    other = generator.run(model_id, job, init_image=init_image, mask_image=_mask((0, 0, 12, 37)))
    assert first.images[0].size == (32, 32)
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_inpaint_resizes_a_mask_of_another_size(
    generator: Generator, init_image: Image.Image
) -> None:
    job = params("inpaint", width=48, height=48)
    result = generator.run(
        "demo", job, init_image=init_image, mask_image=_mask((4, 4, 12, 12), size=(16, 16))
    )
    assert result.images[0].size == (48, 48)


def test_text2video_returns_the_frames(generator: Generator) -> None:
    video = generator.run("demo-video", params("text2video"))
    again = generator.run("demo-video", params("text2video"))
    other = generator.run("demo-video", params("text2video", seed=7))
    assert len(video.images) == 2
    assert {frame.size for frame in video.images} == {(32, 32)}
    assert all(np.array_equal(pixels(video, i), pixels(again, i)) for i in range(2))
    assert not np.array_equal(pixels(video), pixels(other))


@pytest.mark.parametrize(
    ("model_id", "job", "total"),
    [
        # PLMS runs one timestep more than the steps.
        ("demo", params(steps=3), 4),
        ("demo", params(steps=3, scheduler="Heun"), 5),
        # img2img runs int(steps * strength) of them.
        ("demo", params("img2img", steps=4, strength=0.5, scheduler="Euler"), 2),
        ("demo-video", params("text2video", steps=2), 2),
        # The highres fix: 3 + 1 (3 steps at strength 0.5) with DDIM.
        ("demo", params(steps=3, highres_fix=True, scheduler="DDIM"), 4),
    ],
)
def test_on_step_counts_the_whole_job(
    generator: Generator, init_image: Image.Image, model_id: str, job: JobParams, total: int
) -> None:
    calls: list[tuple[int, int]] = []
    generator.run(
        model_id,
        job,
        init_image=init_image,
        on_step=lambda done, of: calls.append((done, of)),
    )
    assert calls == [(done, total) for done in range(1, total + 1)]


def test_check_refuses_before_loading(demo: Registry) -> None:
    cache = PipelineCache(demo, device="cpu")
    generator = Generator(cache, demo)
    with pytest.raises(JobRefused) as caught:
        generator.check("demo-xl", params(panorama=True, width=1024, vae="demo-vae"))
    assert caught.value.fields == {
        "vae": ["The VAE demo-vae is for sd15 models, not sdxl."],
        "panorama": ["The panorama field is not served for sdxl models."],
    }
    assert "The VAE demo-vae is for sd15 models, not sdxl." in str(caught.value)
    with pytest.raises(JobRefused, match="serves inpaint jobs, not txt2img"):
        generator.run("demo-inpaint", params())
    for model_id, job, message in [
        ("nope", params(), "The model nope is not served by this worker."),
        ("demo", params(scheduler="Nope"), "The scheduler Nope is not available."),
        ("demo", params(algorithm_type="dpm4"), "The algorithm type dpm4 is not available."),
        ("demo", params(guidance_scale=float("inf")), "The guidance scale must be a finite"),
        ("demo", params(seed=2**64), "The seed must lie in"),
    ]:
        with pytest.raises(ValueError, match=message):
            generator.check(model_id, job)
    assert cache.loaded_ids() == []


def test_missing_inputs_are_client_errors(generator: Generator) -> None:
    with pytest.raises(ValueError, match="no init image"):
        generator.run("demo", params("img2img"))
    with pytest.raises(ValueError, match="no mask image"):
        generator.run("demo", params("inpaint"), init_image=Image.new("RGB", (64, 64)))
    with pytest.raises(ValueError, match="smaller than 8 pixels"):
        generator.run("demo", params("img2img"), init_image=Image.new("RGB", (64, 6)))


def test_plms_runs_few_steps_on_a_model_with_another_scheduler(generator: Generator) -> None:
    # The video model ships DDIM; PNDM built from that config would warm up with Runge-Kutta
    # steps, which need at least 4 (diffusers raises below). make_scheduler asks for PLMS.
    video = generator.run("demo-video", params("text2video", scheduler="PLMS", steps=2))
    assert len(video.images) == 2


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((72, 64), (72, 64)),
        ((75, 70), (72, 64)),
        ((4096, 2048), (1024, 512)),
        ((900, 3000), (304, 1024)),
    ],
)
def test_an_init_image_size_is_rounded_and_brought_within_1024(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    from workers.pipelines.common import output_size

    assert output_size(None, None, Image.new("RGB", size)) == expected


def test_each_pipeline_call_gets_a_fresh_copy_of_the_models_scheduler(
    generator: Generator, cache: PipelineCache
) -> None:
    first = generator.run("demo", params(seed=7))
    loaded = cache.get("demo")
    [prototype] = [
        s for key, s in loaded.schedulers.items() if key[0].class_name == "PNDMScheduler"
    ]
    used = loaded.pipe.scheduler
    assert used is not prototype and used.config == prototype.config
    # The job's run left its state on the copy (set_timesteps); the prototype was never run.
    assert prototype.num_inference_steps is None and used.num_inference_steps is not None
    again = generator.run("demo", params(seed=7))
    assert loaded.pipe.scheduler is not used
    assert np.array_equal(pixels(first), pixels(again))


def test_inputs_are_taken_once_the_model_is_ready_and_set_the_size(
    generator: Generator, cache: PipelineCache, init_image: Image.Image
) -> None:
    asked: list[bool] = []

    def inputs() -> tuple[Image.Image | None, Image.Image | None]:
        asked.append("demo" in cache.loaded_ids())
        return init_image, None

    result = generator.run("demo", params("img2img"), inputs=inputs)
    assert asked == [True]
    assert (result.width, result.height) == (32, 32)  # the init image's, rounded down to 8
