"""Training augmentation, seeded per pair: the same crop whether pixels are decoded in a loader worker or on the device.

The one training crop: torchvision's RandomResizedCrop (a mild one, and no flip, since captions say "left" and
"right"), with its parameters drawn from an explicit ``torch.Generator`` seeded per pair instead of the global RNG
(forking and reseeding that costs ~0.25 ms a pair); the draws are the same, so the pixels are too. An augmentation
depends only on (run seed, epoch, row): resumed runs, any number of loader workers and any number of processes see
the same pixels.

Two places can decode:
- loader workers (the default): Pillow, at a reduced JPEG scale when the output is much smaller than the source;
- the training process, on its device (``decode_on_device``): workers only pass the JPEG bytes on, and the batch is
  decoded with nvjpeg on CUDA (libjpeg-turbo on CPU; crossmodal/model/device_decode.py), then given this same crop.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from crossmodal.config import ModelConfig
from crossmodal.data.images import REDUCING_GAP, decode_image

# The training crop: a mild random resized crop and torchvision's default aspect ratios.
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def resized_crop_params(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of RandomResizedCrop(scale=CROP_SCALE, ratio=CROP_RATIO), drawn from ``generator``.

    The same draws, in the same order, as torchvision's ``v2.RandomResizedCrop.make_params`` makes from the global
    RNG, so a generator seeded with s gives the crop ``torch.manual_seed(s)`` would.
    """
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*CROP_SCALE, generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(*log_ratio, generator=generator)).item()
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    # No fit in ten tries: the central crop torchvision falls back to.
    in_ratio = width / height
    if in_ratio < min(CROP_RATIO):
        w, h = width, round(width / min(CROP_RATIO))
    elif in_ratio > max(CROP_RATIO):
        w, h = round(height * max(CROP_RATIO)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainAugment:
    """uint8 image [3, H, W] (any device) + seed -> the normalised random crop [3, S, S] on that device."""

    def __init__(self, config: ModelConfig) -> None:
        self.size = config.image_size
        self.mean = list(config.image_mean)
        self.std = list(config.image_std)

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)  # CPU draws whatever the image's device: same crop everywhere
        top, left, height, width = resized_crop_params(image.shape[-2], image.shape[-1], generator)
        crop = F.resized_crop(
            image, top, left, height, width, [self.size, self.size],
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        )  # fmt: skip
        return F.normalize(F.to_dtype(crop, torch.float32, scale=True), self.mean, self.std)

    def draft_size(self) -> tuple[int, int]:
        """The smallest size JPEG decode may scale down to: the smallest crop (0.8 of a side) still resizes down."""
        side = math.ceil(REDUCING_GAP * self.size / CROP_SCALE[0])
        return side, side

    def decode(self, data: bytes, seed: int) -> torch.Tensor:
        """The worker path: Pillow decode (DCT-scaled when the crop allows it), then the seeded crop."""
        image = decode_image(data, draft_size=self.draft_size())
        return self(F.pil_to_tensor(image), seed)
