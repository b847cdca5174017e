"""MultiDiffusion panorama: diffusers' StableDiffusionPanoramaPipeline with its window grid fixed.

Copied and changed from diffusers 0.42.1 ``StableDiffusionPanoramaPipeline.get_views``, which
measures the grid in latents of a hard-coded VAE factor 8 (64-latent windows, stride 8) and
places windows only at whole strides from the top-left corner. Two consequences there:

- a side that is not 512 + a multiple of 64 pixels keeps a strip on the right or bottom that no
  window covers; the pipeline leaves those latents at zero, a grey band in the image;
- a VAE with another factor (the tiny test models halve the size, not divide by 8) gets windows
  of the wrong size.

Here the grid is measured in pixels (512-pixel windows, 64-pixel stride, as diffusers intends
for SD) through the pipeline's own ``vae_scale_factor``, and a last window flush with the far
edge covers any remainder. For sizes diffusers covers fully the views are identical.
"""

from __future__ import annotations

from diffusers.pipelines.deprecated.stable_diffusion_panorama.pipeline_stable_diffusion_panorama import (  # noqa: E501
    StableDiffusionPanoramaPipeline,
)

WINDOW_PIXELS = 512
STRIDE_PIXELS = 64


class PanoramaPipeline(StableDiffusionPanoramaPipeline):
    def get_views(
        self,
        panorama_height: int,
        panorama_width: int,
        window_size: int = 64,
        stride: int = 8,
        circular_padding: bool = False,
    ) -> list[tuple[int, int, int, int]]:
        """The (h_start, h_end, w_start, w_end) latent windows that tile the image.

        ``window_size`` and ``stride`` (diffusers' latent defaults) are ignored in favour of the
        pixel sizes above; circular padding is not used by dreamq and keeps diffusers' grid.
        """
        if circular_padding:
            return super().get_views(
                panorama_height, panorama_width, window_size, stride, circular_padding
            )
        factor = self.vae_scale_factor
        window, step = WINDOW_PIXELS // factor, STRIDE_PIXELS // factor
        rows = _starts(panorama_height // factor, window, step)
        columns = _starts(panorama_width // factor, window, step)
        return [(top, top + window, left, left + window) for top in rows for left in columns]


def _starts(length: int, window: int, step: int) -> list[int]:
    """Window offsets along one side of ``length`` latents: every ``step``, plus one flush with
    the end when the strides leave a remainder; one window when the side is no longer than it
    (slicing clips the window to the side)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, step))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts
