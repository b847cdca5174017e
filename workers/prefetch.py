"""A job's input images, downloaded while the same job's model is made ready.

Celery hands a pool process one message at a time (prefetch 1, late acks), so the next job's
inputs cannot be fetched during this job's compute without reserving its message, which would
keep a job from a worker that could run it now. What can overlap is inside one job: the
`init_image` and `mask_image` downloads run on helper threads from the moment the job's parameters
are checked, while the main thread translates the prompt, takes the model from the cache (a cold
load: seconds) and switches its LoRAs, embedding and VAE; the generator waits for the images only
when the pipeline needs them (`Generator.run(inputs=...)`).

Each download gets its own short-lived thread rather than a shared pool: a download left behind
by a job that failed first (a model that would not load) runs out on its own deadline
(`DREAMQ_INPUT_TIMEOUT_SECONDS`) and never delays the next job's.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable

from PIL import Image

from dreamq.jobparams import ImageInput

FetchImage = Callable[[ImageInput, str], Image.Image]
"""Loads an input image (a URL or a stored object) for a field; PublicJobError when it cannot."""

Inputs = tuple[Image.Image | None, Image.Image | None]
"""(init image, mask image)."""


class _Download:
    def __init__(self, fetch: FetchImage, ref: ImageInput, field: str) -> None:
        self._image: Image.Image | None = None
        self._error: BaseException | None = None
        context = contextvars.copy_context()  # the job's log context, for the fetch's lines
        self._thread = threading.Thread(
            target=context.run,
            args=(self._fetch, fetch, ref, field),
            name=f"dreamq-input-{field}",
            daemon=True,
        )
        self._thread.start()

    def _fetch(self, fetch: FetchImage, ref: ImageInput, field: str) -> None:
        try:
            self._image = fetch(ref, field)
        except BaseException as exc:  # handed to the job's thread, which raises it
            self._error = exc

    def result(self) -> Image.Image:
        # A soft time limit (a signal in the main thread) interrupts the join.
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._image is not None
        return self._image


def start_inputs(
    fetch: FetchImage,
    init_image: ImageInput | None,
    mask_image: ImageInput | None,
    *,
    background: bool,
) -> Callable[[], Inputs]:
    """The job's input images, as a call that returns them. In the `background`, downloads start
    now on helper threads and the call waits for them (an init image's error first, as fetched
    in order); otherwise they are fetched here, in order, before this returns."""
    if not background or (init_image is None and mask_image is None):
        init = None if init_image is None else fetch(init_image, "init_image")
        mask = None if mask_image is None else fetch(mask_image, "mask_image")
        return lambda: (init, mask)
    pending = [
        None if ref is None else _Download(fetch, ref, field)
        for ref, field in ((init_image, "init_image"), (mask_image, "mask_image"))
    ]
    taken: list[Inputs] = []

    def images() -> Inputs:
        if not taken:
            first, second = (None if d is None else d.result() for d in pending)
            taken.append((first, second))
        return taken[0]

    return images
