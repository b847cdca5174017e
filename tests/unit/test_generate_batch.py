"""Generator.run_batch on the tiny demo models: jobs with one batch key drawn in one pipeline
call give each job's images as it gets them alone, up to float noise; a job's own failure stays
in its slot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dreamq.errors import PublicJobError
from dreamq.jobparams import JobParams, LoraChoice
from dreamq.registry import Registry, load_registry
from tests.support.generation import params, pixels
from workers.generate import Generation, Generator, JobRefused
from workers.models import PipelineCache
from workers.pipelines import common

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

Inputs = Callable[[], tuple[Image.Image | None, Image.Image | None]]

# Batched convolutions and matmuls add in another order than a job's own: measured on the
# project machine (CPU, float32), every case below differs from the job alone by 0 or 1 grey
# level, as test_generate's batched samples do from single ones.
MAX_DIFFERENCE = 1


@pytest.fixture(scope="module")
def demo(demo_registry_file: Path) -> Registry:
    return load_registry(demo_registry_file)


@pytest.fixture(scope="module")
def cache(demo: Registry) -> PipelineCache:
    return PipelineCache(demo, device="cpu")


@pytest.fixture(scope="module")
def generator(cache: PipelineCache, demo: Registry) -> Generator:
    return Generator(cache, demo)


def picture(seed: int, size: tuple[int, int] = (40, 36)) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3))
    return Image.fromarray(values.astype(np.uint8))


def mask(box: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("L", (40, 36), 0)
    image.paste(255, box)
    return image


def given(init: Image.Image | None, mask_image: Image.Image | None = None) -> Inputs:
    return lambda: (init, mask_image)


def generations(results: list[Generation | Exception]) -> list[Generation]:
    assert all(isinstance(result, Generation) for result in results), results
    return [result for result in results if isinstance(result, Generation)]


def largest_difference(
    generator: Generator,
    model_id: str,
    jobs: list[JobParams],
    inputs: Sequence[tuple[Image.Image | None, Image.Image | None]],
) -> int:
    """The largest pixel difference between each job's batched images and its images alone."""
    batched = generations(
        generator.run_batch(
            model_id, jobs, inputs=[None if pair[0] is None else given(*pair) for pair in inputs]
        )
    )
    largest = 0
    for job, (init, mask_image), result in zip(jobs, inputs, batched, strict=True):
        alone = generator.run(model_id, job, init_image=init, mask_image=mask_image)
        assert len(result.images) == job.samples
        assert (result.width, result.height) == (alone.width, alone.height)
        for index in range(job.samples):
            largest = max(largest, int(np.abs(pixels(result, index) - pixels(alone, index)).max()))
    return largest


def three(
    kind: str = "txt2img",
    negative: str | None = "blurry",
    samples: tuple[int, int, int] = (1, 2, 1),
    **shared: Any,
) -> list[JobParams]:
    """Three jobs with one batch key and their own prompts, seeds and samples."""
    # All with a negative prompt or all without: None and "" have different keys.
    negatives = [negative, None if negative is None else "", negative and "ugly"]
    prompts = ["a watercolor fox", "an oil painting of a lighthouse", "a pencil sketch"]
    jobs = [
        params(kind, prompt=prompt, negative_prompt=own, seed=seed, samples=count, **shared)
        for prompt, own, seed, count in zip(prompts, negatives, (3, 500, 41), samples, strict=True)
    ]
    assert len({job.batch_key() for job in jobs}) == 1
    return jobs


@pytest.mark.parametrize(
    ("model_id", "negative"), [("demo", "blurry"), ("demo", None), ("demo-xl", None)]
)
def test_a_txt2img_batch_gives_each_job_its_images_alone(
    generator: Generator, model_id: str, negative: str | None
) -> None:
    jobs = three(negative=negative)
    assert largest_difference(generator, model_id, jobs, [(None, None)] * 3) <= MAX_DIFFERENCE


def test_the_features_of_the_first_job_serve_the_whole_batch(generator: Generator) -> None:
    jobs = three(loras=(LoraChoice("demo-lora-a", 0.8),), clip_skip=2, vae="demo-vae")
    assert largest_difference(generator, "demo", jobs, [(None, None)] * 3) <= MAX_DIFFERENCE


@pytest.mark.parametrize("model_id", ["demo", "demo-xl"])
def test_an_img2img_batch_gives_each_job_its_images_alone(
    generator: Generator, model_id: str
) -> None:
    jobs = three("img2img", width=32, height=24, steps=4, strength=0.5)
    inputs = [(picture(seed), None) for seed in range(3)]
    assert largest_difference(generator, model_id, jobs, inputs) <= MAX_DIFFERENCE


@pytest.mark.parametrize("model_id", ["demo", "demo-inpaint", "demo-xl"])
def test_an_inpaint_batch_gives_each_job_its_images_alone(
    generator: Generator, model_id: str
) -> None:
    # One sample each: inpainting of several samples has no batch key (JobParams.batch_key).
    jobs = three("inpaint", samples=(1, 1, 1), width=32, height=32, steps=3)
    boxes = [(0, 0, 20, 20), (8, 8, 30, 30), (10, 0, 40, 12)]
    inputs = [(picture(seed), mask(box)) for seed, box in enumerate(boxes)]
    assert largest_difference(generator, model_id, jobs, inputs) <= MAX_DIFFERENCE


def test_a_job_whose_inputs_fail_gets_its_error_and_the_others_run(
    generator: Generator,
) -> None:
    jobs = three("img2img", width=32, height=32, steps=4)
    failed = PublicJobError("The init image could not be fetched.")

    def fetch_fails() -> tuple[Image.Image | None, Image.Image | None]:
        raise failed

    first, second, third = generator.run_batch(
        "demo", jobs, inputs=[given(picture(0)), fetch_fails, given(None)]
    )
    assert second is failed
    assert isinstance(third, ValueError) and str(third) == "The job has no init image."
    assert isinstance(first, Generation)
    alone = generator.run("demo", jobs[0], init_image=picture(0))
    # Left alone in the call, the first job runs exactly as it does alone.
    assert np.array_equal(pixels(first), pixels(alone))


def test_a_job_that_fails_its_check_gets_its_error_and_the_others_run(
    generator: Generator,
) -> None:
    jobs = three()
    jobs[1] = replace(jobs[1], seed=2**64 - 1)
    first, second, third = generator.run_batch("demo", jobs, inputs=[None] * 3)
    assert isinstance(second, ValueError) and "The seed must lie in" in str(second)
    assert [len(result.images) for result in generations([first, third])] == [1, 1]


def test_a_failure_of_the_shared_call_fails_every_job_in_it(generator: Generator) -> None:
    # The tiny text encoder has 2 layers: a skip of 5 is refused once the model is loaded.
    jobs = three("img2img", width=32, height=32, clip_skip=5)
    failed = PublicJobError("The mask image could not be fetched.")

    def fetch_fails() -> tuple[Image.Image | None, Image.Image | None]:
        raise failed

    first, second, third = generator.run_batch(
        "demo", jobs, inputs=[given(picture(0)), fetch_fails, given(picture(1))]
    )
    assert second is failed
    assert isinstance(first, JobRefused) and first is third
    assert "clip_skip" in first.fields


def test_a_batch_of_one_is_the_job_alone(generator: Generator) -> None:
    job = params(samples=2, seed=8)
    [result] = generator.run_batch("demo", [job], inputs=[None])
    alone = generator.run("demo", job)
    assert isinstance(result, Generation)
    assert all(np.array_equal(pixels(result, i), pixels(alone, i)) for i in range(2))
    [refused] = generator.run_batch("demo", [replace(job, seed=2**64 - 1)], inputs=[None])
    assert isinstance(refused, ValueError)


def test_the_call_time_is_shared_by_samples(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator.run("demo", params())  # loaded before the clock is replaced
    # One pipeline call reads the clock twice: a second call would exhaust it.
    clock = iter([10.0, 18.0])
    monkeypatch.setattr(common, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    results = generations(generator.run_batch("demo", three(), inputs=[None] * 3))
    assert [result.pipeline_seconds for result in results] == [2.0, 4.0, 2.0]


@pytest.mark.parametrize(
    "jobs",
    [
        [],
        [params(), params(steps=3)],
        [params(seed=1), params(seed=2, negative_prompt="")],
        [params(panorama=True, width=1024), params(panorama=True, width=1024)],
    ],
)
def test_a_batch_must_share_one_batch_key(generator: Generator, jobs: list[JobParams]) -> None:
    with pytest.raises(ValueError, match="one batch key"):
        generator.run_batch("demo", jobs, inputs=[None] * len(jobs))


def test_a_batch_needs_inputs_for_every_job(generator: Generator) -> None:
    with pytest.raises(ValueError, match="one inputs entry per job"):
        generator.run_batch("demo", [params(), params(seed=2)], inputs=[None])
