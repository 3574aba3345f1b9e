"""Batch augmentation on any device (run it on the GPU after the batch is moved there).

The thesis's set: brightness/contrast, horizontal flip, shift-scale-rotate, cutout. A crack one
or two pixels wide does not survive resampling at sub-pixel offsets (a bilinear rotation or zoom
smears it into a shade), so the crack-keeping set moves pixels only by whole pixels: flips,
transposes (the 1st place's), shifts rounded to whole pixels (`whole_pixel_shift` with rotate 0
and scale 0 makes the affine an exact shift), intensity and contrast, and Gaussian noise. Every
sample of a batch draws its own parameters; a (B, L, C, H, W) vertebra sequence gets one
draw per sample for all L steps (the steps are folded into channels), so a sequence stays
spatially consistent. Stage-1 boxes (one or several per sample) are moved with the image: flip,
then the affine, then the bounding box of the moved corners, clipped to the image. The last
`fixed_channels` channels of each image (or step) are planes that mark places, such as stage
2's box channel: they move with the image but keep their values (no brightness, contrast,
cutout or noise).

All random numbers come from `generator` (CPU by default): one `torch.rand` call for the thesis
set, then, only when a later option is on, one for those and one `torch.randn` for the noise (so
the thesis set draws what it always drew). A seeded generator gives the same result on every
device. Images are expected in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Probabilities are per sample; ranges are symmetric (+-limit)."""

    enabled: bool = True
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    transpose_p: float = 0.0            # swap rows and columns (square images only)
    brightness: float = 0.2             # additive shift, fraction of the [0, 1] range
    contrast: float = 0.2               # gain 1 +- contrast
    brightness_contrast_p: float = 0.5
    shift: float = 0.0625               # fraction of the image width / height
    scale: float = 0.1                  # zoom 1 +- scale
    rotate: float = 15.0                # degrees
    affine_p: float = 0.5
    whole_pixel_shift: bool = False     # round the shift to whole pixels
    cutout_holes: int = 1
    cutout_size: float = 0.1            # square side, fraction of the shorter image side
    cutout_p: float = 0.5
    noise: float = 0.0                  # Gaussian noise sd, fraction of the [0, 1] range
    noise_p: float = 0.5

    def __post_init__(self):
        for name in ("hflip_p", "vflip_p", "transpose_p", "brightness_contrast_p", "affine_p",
                     "cutout_p", "noise_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "shift", "scale", "rotate", "cutout_size", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.scale >= 1:
            raise ValueError(f"scale must be < 1 (zoom 1 +- scale stays positive), got {self.scale}")
        if self.cutout_holes < 0:
            raise ValueError(f"cutout_holes must be >= 0, got {self.cutout_holes}")


# columns of the per-sample uniform draws
_BC, _BRIGHT, _CONTRAST, _FLIP, _AFFINE, _ANGLE, _SCALE, _TX, _TY, _CUT = range(10)
_HOLES = 10  # then cutout_holes x-centres, then cutout_holes y-centres
_VFLIP, _TRANSPOSE, _NOISE = range(3)  # columns of the later options' draws


def _symmetric(u: torch.Tensor, limit: float) -> torch.Tensor:
    return (2 * u - 1) * limit


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None,
                  boxes: torch.Tensor | None = None, fixed_channels: int = 0):
    """Augment a batch x (B, C, H, W) or (B, L, C, H, W); returns x, or (x, boxes) when boxes
    (B, 4) or (B, K, 4) normalised x0, y0, x1, y1 are given (NaN boxes stay NaN). The last
    `fixed_channels` of the C channels are only moved."""
    if x.dim() not in (4, 5):
        raise ValueError(f"expected (B, C, H, W) or (B, L, C, H, W), got shape {tuple(x.shape)}")
    b, (h, w) = x.shape[0], x.shape[-2:]
    if boxes is not None and not (boxes.dim() in (2, 3) and len(boxes) == b and boxes.shape[-1] == 4):
        raise ValueError(f"boxes must be ({b}, 4) or ({b}, K, 4), got {tuple(boxes.shape)}")
    if not 0 <= fixed_channels <= x.shape[-3]:
        raise ValueError(f"fixed_channels must be in 0..{x.shape[-3]}, got {fixed_channels}")
    if not cfg.enabled or b == 0:
        return x if boxes is None else (x, boxes)
    box_shape = None if boxes is None else boxes.shape
    if boxes is not None:
        boxes = boxes.reshape(b, -1, 4)
    if cfg.transpose_p > 0 and h != w:
        raise ValueError(f"transpose_p needs square images, got {h} x {w}")

    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((b, _HOLES + 2 * cfg.cutout_holes), generator=generator, device=device)
    u = u.to(device=x.device, dtype=torch.float32)
    v = None
    if cfg.vflip_p > 0 or cfg.transpose_p > 0 or cfg.noise > 0:
        v = torch.rand((b, 3), generator=generator, device=device).to(x.device, torch.float32)
    out = x.reshape(b, -1, h, w)  # steps folded into channels: one transform per sample
    # the channels whose values change (the image's, not the fixed planes'): (1, L*C, 1, 1)
    image = torch.ones(x.shape[-3], dtype=torch.bool, device=x.device)
    image[x.shape[-3] - fixed_channels:] = False
    image = image.repeat(out.shape[1] // x.shape[-3])[None, :, None, None]

    # brightness / contrast
    apply = (u[:, _BC] < cfg.brightness_contrast_p)[:, None, None, None] & image
    gain = (1 + _symmetric(u[:, _CONTRAST], cfg.contrast))[:, None, None, None].to(out.dtype)
    shift = _symmetric(u[:, _BRIGHT], cfg.brightness)[:, None, None, None].to(out.dtype)
    out = torch.where(apply, (out * gain + shift).clamp(0.0, 1.0), out)

    # horizontal flip
    flip = u[:, _FLIP] < cfg.hflip_p
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if boxes is not None:
        flipped = torch.stack([1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]], -1)
        boxes = torch.where(flip[:, None, None].to(boxes.device), flipped, boxes)

    # vertical flip and transpose: whole-pixel moves, so a crack keeps its pixels
    if cfg.vflip_p > 0:
        flip = v[:, _VFLIP] < cfg.vflip_p
        out = torch.where(flip[:, None, None, None], out.flip(-2), out)
        if boxes is not None:
            flipped = torch.stack([boxes[..., 0], 1 - boxes[..., 3], boxes[..., 2], 1 - boxes[..., 1]], -1)
            boxes = torch.where(flip[:, None, None].to(boxes.device), flipped, boxes)
    if cfg.transpose_p > 0:
        swap = v[:, _TRANSPOSE] < cfg.transpose_p
        out = torch.where(swap[:, None, None, None], out.transpose(-1, -2), out)
        if boxes is not None:
            swapped = boxes[..., [1, 0, 3, 2]]
            boxes = torch.where(swap[:, None, None].to(boxes.device), swapped, boxes)

    # shift-scale-rotate: forward map A u + t in normalised [-1, 1] coordinates
    apply = u[:, _AFFINE] < cfg.affine_p
    if cfg.affine_p > 0:
        angle = _symmetric(u[:, _ANGLE], math.radians(cfg.rotate))
        zoom = 1 + _symmetric(u[:, _SCALE], cfg.scale)
        t = torch.stack([_symmetric(u[:, _TX], cfg.shift), _symmetric(u[:, _TY], cfg.shift)], 1) * 2
        if cfg.whole_pixel_shift:  # a pixel is 2 / w (2 / h) wide in normalised coordinates
            pixel = torch.tensor([2.0 / w, 2.0 / h], device=t.device)
            t = torch.round(t / pixel) * pixel
        cos, sin = torch.cos(angle), torch.sin(angle)
        # rotation in pixel space seen in normalised coordinates (differs from R when H != W)
        forward = torch.stack([torch.stack([cos, -sin * h / w], 1),
                               torch.stack([sin * w / h, cos], 1)], 1) * zoom[:, None, None]
        inverse = torch.stack([torch.stack([cos, sin * h / w], 1),
                               torch.stack([-sin * w / h, cos], 1)], 1) / zoom[:, None, None]
        theta = torch.cat([inverse, -(inverse @ t[:, :, None])], dim=2)  # output -> input coords
        grid = F.affine_grid(theta.to(out.dtype), list(out.shape), align_corners=False)
        warped = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = torch.where(apply[:, None, None, None], warped, out)
        if boxes is not None:
            boxes = _move_boxes(boxes, forward.to(boxes.device), t.to(boxes.device),
                                apply.to(boxes.device))

    # cutout: square holes filled with 0
    if cfg.cutout_holes and cfg.cutout_size > 0:
        n = cfg.cutout_holes
        cx = u[:, _HOLES:_HOLES + n] * w
        cy = u[:, _HOLES + n:_HOLES + 2 * n] * h
        half = cfg.cutout_size * min(h, w) / 2
        xs = torch.arange(w, device=x.device, dtype=torch.float32) + 0.5
        ys = torch.arange(h, device=x.device, dtype=torch.float32) + 0.5
        in_x = (xs[None, None, :] - cx[:, :, None]).abs() < half    # (B, n, W)
        in_y = (ys[None, None, :] - cy[:, :, None]).abs() < half    # (B, n, H)
        holes = (in_y[:, :, :, None] & in_x[:, :, None, :]).any(dim=1)  # (B, H, W)
        holes &= (u[:, _CUT] < cfg.cutout_p)[:, None, None]
        out = out.masked_fill(holes[:, None] & image, 0.0)

    if cfg.noise > 0:
        noisy = v[:, _NOISE] < cfg.noise_p
        noise = torch.randn(out.shape, generator=generator, device=device).to(out.device, out.dtype)
        noisy = noisy[:, None, None, None] & image
        out = torch.where(noisy, (out + cfg.noise * noise).clamp(0.0, 1.0), out)

    out = out.reshape(x.shape)
    return out if boxes is None else (out, boxes.reshape(box_shape))


def _move_boxes(boxes: torch.Tensor, forward: torch.Tensor, t: torch.Tensor,
                apply: torch.Tensor) -> torch.Tensor:
    """Bounding box of the four moved corners of (B, K, 4) boxes, clipped to [0, 1]; samples not
    in `apply` unchanged."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    corners = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                           torch.stack([x0, y1], -1), torch.stack([x1, y1], -1)], -2)  # (B, K, 4, 2)
    moved = ((corners * 2 - 1) @ forward.to(boxes.dtype).transpose(1, 2)[:, None]
             + t[:, None, None].to(boxes.dtype))
    moved = (moved + 1) / 2
    lo, hi = moved.min(dim=-2).values, moved.max(dim=-2).values  # NaN corners give NaN, as wanted
    new = torch.cat([lo, hi], dim=-1).clamp(0.0, 1.0)
    return torch.where(apply[:, None, None], new, boxes)
