"""Image preprocessing and augmentation.

The fast path works on uint8 tensors: ``pil_to_uint8`` resizes each decoded image once
(the cache stores its output, prediction calls it directly), then per batch, on whatever
device the batch is on, ``augment_batch`` (training only) and ``normalize_batch`` (with the
run's colour normalisation, ``data.color_norm``, where its data config has one).
``create_transform`` is the classic per-image torchvision PIL pipeline, kept for the
benchmark's naive baseline and for comparison; its eval output equals the fast path's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from bloodcell_lib.data.color_augment import stain_jitter

# Bicubic for every model (PIL's resize is antialiased when shrinking). Cells sit in the
# centre, but the whole field is kept (no centre crop): neighbouring red cells and
# platelets are context. One fixed resize means one cache per image size shared by all
# models, and training and prediction cannot disagree; the weights' own interpolation
# (bilinear for torchvision models) matters little once the network is fine-tuned.
RESIZE_INTERPOLATION = InterpolationMode.BICUBIC
# Part of the cache key: bump whenever pil_to_uint8's output changes.
PREPROCESS_VERSION = 1

AUGMENT_LEVELS = ("none", "light", "strong", "stain", "acquisition")
# "strong" on top of the dihedral flips/rotations: random resized crop (area fraction and
# aspect ratio of the crop) and small colour jitter (stain and illumination vary by lab).
STRONG = {"scale": (0.65, 1.0), "ratio": (3 / 4, 4 / 3),
          "brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.02}
# "stain": the same crop, wider colour jitter (another lab's camera and light, ranges of
# torchvision/albumentations' usual ColorJitter settings), then color_augment.stain_jitter.
STAIN = {**STRONG, "brightness": 0.2, "contrast": 0.2, "saturation": 0.25, "hue": 0.04}
# "acquisition": "stain" with the crop replaced by a change of framing that also zooms out: the
# cell drawn 0.8-1.25x as large (log-uniform) and moved by up to a tenth of the side, the edges
# filled by reflection. Another microscope's scale, a detector's off-centre window and an
# analyser's wider export then look like training pictures. With 0.8-1.6x the pbc recipe lost
# 0.5 points of validation accuracy against 0.8-1.25x (both with the colour temperature below;
# docs/research.md); zooming out further would fill the frame with mirrored copies of the cell.
# Other scales are left to the review flags' scale check.
FRAMING = {"scale": (0.8, 1.25), "shift": 0.1}
# "stain" and "acquisition": the light's colour temperature, drawn uniformly in mired between
# these kelvin and applied as a white-balance error against daylight (6500 K): red and blue scaled
# against green by the black-body ratios of albumentations' PlanckianJitter (Zini et al., "Planckian
# Jitter", 2023). Colour jitter's small hue turns do not cover a halogen lamp's yellow cast.
WHITE_BALANCE_KELVIN = (4000, 12000)
DAYLIGHT_KELVIN = 6500

# RGB -> YIQ. Y is the luma torchvision uses for grayscale, so scaling I and Q by s is
# exactly torchvision's saturation blend, and rotating (I, Q) shifts hue.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                            [0.596, -0.274, -0.322],
                            [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def pil_to_uint8(img: Image.Image, image_size: int) -> torch.Tensor:
    """THE preprocessing step: the whole image resized to S x S, as a uint8 tensor [3, S, S]."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    return TF.pil_to_tensor(TF.resize(img, [image_size, image_size], interpolation=RESIZE_INTERPOLATION))


def normalize_batch(x: torch.Tensor, data_config: dict, channels_last: bool = True) -> torch.Tensor:
    """[N, 3, S, S] uint8 (0..255) or float (0..1) -> float32 normalised with the data config:
    first each picture's colours moved to the run's reference (``data_config["color_norm"]``,
    Reinhard; absent: unchanged), then mean/std of the model's weights.

    The input is never modified. ``channels_last`` converts the cheap uint8 batch first,
    so the float result is produced directly in that memory format.
    """
    if data_config.get("color_norm"):
        from bloodcell_lib.data.color_norm import reinhard

        x = reinhard(x.float() / 255.0 if x.dtype == torch.uint8 else x.float(), data_config["color_norm"])
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    mean = torch.tensor(data_config["mean"], device=x.device).view(1, 3, 1, 1) * scale
    std = torch.tensor(data_config["std"], device=x.device).view(1, 3, 1, 1) * scale
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.float().sub(mean).div_(std)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Element ``k`` (0..7) of the square's symmetry group: rotate 90 degrees k % 4 times,
    then mirror left-right when k >= 4. ``dihedral(x, 0)`` is ``x`` itself."""
    x = torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def tta_views(x: torch.Tensor, views: int = 8) -> list[torch.Tensor]:
    """Test-time views of a batch: all 8 dihedral transforms, or 4 (identity, rot180, hflip,
    vflip). A blood cell has no up or down, so the caller averages the softmax over views."""
    if views not in (4, 8):
        raise ValueError(f"views must be 4 or 8, got {views}")
    return [dihedral(x, k) for k in (range(8) if views == 8 else (0, 2, 4, 6))]


def _random_dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Apply dihedral(sample i, k[i]) to every sample: one batched op per group element."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"90-degree rotations need square images, got {tuple(x.shape[-2:])}")
    out = torch.empty_like(x)
    for element in range(8):
        index = (k == element).nonzero().flatten()
        if len(index):
            out[index] = dihedral(x[index], element)
    return out


def _lerp(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


def _random_resized_crop(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-sample crop (area/aspect from STRONG) resampled back to full size, as one affine
    ``grid_sample``. ``u``: [N, 4] uniforms (area, log-ratio, x shift, y shift)."""
    area = _lerp(u[:, 0], *STRONG["scale"])
    ratio = torch.exp(_lerp(u[:, 1], *(math.log(r) for r in STRONG["ratio"])))
    # Half-widths in normalised coordinates [-1, 1]; the crop always stays inside the image.
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * u[:, 2] - 1) * (1 - sx)
    theta[:, 1, 1], theta[:, 1, 2] = sy, (2 * u[:, 3] - 1) * (1 - sy)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _random_framing(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-sample zoom (FRAMING scale, in or out) and shift, as one affine ``grid_sample`` with
    reflected edges. ``u``: [N, 3] uniforms (log-scale, x shift, y shift)."""
    low, high = (math.log(s) for s in FRAMING["scale"])
    zoom = torch.exp(_lerp(u[:, 0], low, high))
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom  # sampling grid spacing: > 1 zooms out
    theta[:, 0, 2] = _lerp(u[:, 1], -2 * FRAMING["shift"], 2 * FRAMING["shift"])
    theta[:, 1, 2] = _lerp(u[:, 2], -2 * FRAMING["shift"], 2 * FRAMING["shift"])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _color_jitter(x: torch.Tensor, u: torch.Tensor, ranges: dict = STRONG) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation and hue on floats in [0, 1], by ``ranges``.
    ``u``: [N, 4] uniforms. Saturation and hue are one 3x3 colour matrix per sample."""
    n = len(x)
    brightness, contrast, saturation = (_lerp(u[:, i], 1 - ranges[key], 1 + ranges[key])
                                        for i, key in enumerate(("brightness", "contrast", "saturation")))
    angle = _lerp(u[:, 3], -ranges["hue"], ranges["hue"]) * 2 * math.pi
    x = x * brightness.view(n, 1, 1, 1)
    luma = _RGB_TO_YIQ[0].to(x.device).view(1, 3, 1, 1)
    mean_gray = (x * luma).sum(1, keepdim=True).mean((-2, -1), keepdim=True)
    x = (x - mean_gray) * contrast.view(n, 1, 1, 1) + mean_gray
    chroma = torch.zeros(n, 3, 3, device=x.device)
    chroma[:, 0, 0] = 1
    chroma[:, 1, 1] = chroma[:, 2, 2] = saturation * torch.cos(angle)
    chroma[:, 1, 2] = -saturation * torch.sin(angle)
    chroma[:, 2, 1] = saturation * torch.sin(angle)
    matrix = _YIQ_TO_RGB.to(x.device) @ chroma @ _RGB_TO_YIQ.to(x.device)
    return torch.einsum("nij,njhw->nihw", matrix, x).clamp_(0, 1)


def _black_body_gains(kelvin: torch.Tensor) -> torch.Tensor:
    """[N, 3] RGB gains of a white-balance error: the black-body R/G and B/G ratios at ``kelvin``
    (linear between the table's 500 K steps) over those at daylight, green kept."""
    from albumentations.augmentations.pixel.functional import PLANCKIAN_COEFFS

    table = PLANCKIAN_COEFFS["blackbody"]
    temps = torch.tensor(sorted(table), dtype=torch.float32)
    coeffs = torch.tensor([table[t] for t in sorted(table)], dtype=torch.float32)
    ratios = coeffs[:, [0, 2]] / coeffs[:, 1:2]

    def at(k: torch.Tensor) -> torch.Tensor:
        right = torch.searchsorted(temps, k.clamp(temps[0], temps[-1])).clamp(1, len(temps) - 1)
        w = ((k - temps[right - 1]) / (temps[right] - temps[right - 1])).clamp(0, 1).unsqueeze(1)
        return ratios[right - 1] * (1 - w) + ratios[right] * w

    red_blue = at(kelvin) / at(torch.tensor([float(DAYLIGHT_KELVIN)]))
    return torch.stack([red_blue[:, 0], torch.ones(len(kelvin)), red_blue[:, 1]], dim=1)


def _white_balance(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-sample colour temperature (WHITE_BALANCE_KELVIN, uniform in mired) on floats in [0, 1].
    ``u``: [N] uniforms."""
    low, high = (1e6 / k for k in sorted(WHITE_BALANCE_KELVIN, reverse=True))
    kelvin = 1e6 / _lerp(u.cpu().float(), low, high)
    gains = _black_body_gains(kelvin).to(x.device, x.dtype)
    return (x * gains.view(len(x), 3, 1, 1)).clamp_(0, 1)


def augment_batch(x: torch.Tensor, generator: torch.Generator, level: str) -> torch.Tensor:
    """Random per-sample augmentation of a batch [N, 3, S, S], uint8 or float in [0, 1];
    the result has the input's dtype and device.

    ``light``: a random one of the 8 flips/90-degree rotations (exact, any dtype).
    ``strong``: that plus a random resized crop and colour jitter (see STRONG).
    ``stain``: that with wider colour jitter (STAIN), a colour temperature (WHITE_BALANCE_KELVIN),
    then stain, gamma, blur and noise (color_augment.stain_jitter).
    ``acquisition``: ``stain`` with a zoom in or out and shift (FRAMING) instead of the crop.
    All randomness is drawn up front from ``generator`` (which may live on another device
    than ``x``) in a fixed order, so one seed gives the same batch on CPU and GPU.
    """
    if level not in AUGMENT_LEVELS:
        raise ValueError(f"augment level {level!r} is not accepted; use one of: {', '.join(AUGMENT_LEVELS)}")
    if level == "none":
        return x
    n = len(x)
    k = torch.randint(8, (n,), generator=generator, device=generator.device).to(x.device)
    x = _random_dihedral(x, k)
    if level == "light":
        return x
    u = torch.rand((n, 8), generator=generator, device=generator.device).to(x.device)
    is_uint8 = x.dtype == torch.uint8
    y = x.float() / 255 if is_uint8 else x
    framed = _random_framing(y, u[:, :3]) if level == "acquisition" else _random_resized_crop(y, u[:, :4])
    y = _color_jitter(framed, u[:, 4:], STRONG if level == "strong" else STAIN)
    if level in ("stain", "acquisition"):
        kelvin = torch.rand((n,), generator=generator, device=generator.device).to(x.device)
        y = stain_jitter(_white_balance(y, kelvin), generator)
    return y.mul(255).round_().clamp_(0, 255).to(torch.uint8) if is_uint8 else y.to(x.dtype)


def create_transform(data_config: dict, image_size: int, *, train: bool, augment: str = "none") -> T.Compose:
    """Classic per-image PIL pipeline -> normalised float tensor [3, S, S].

    Same resize as ``pil_to_uint8`` and the same augmentation families as ``augment_batch``
    (torchvision's own random draws), so its eval output matches the fast path.
    """
    classic = AUGMENT_LEVELS[:3]  # "stain" has no torchvision counterpart: fast path only
    if augment not in classic:
        raise ValueError(f"augment level {augment!r} is not accepted here; use one of: {', '.join(classic)}")
    steps: list = [T.Resize((image_size, image_size), interpolation=RESIZE_INTERPOLATION)]
    if train and augment != "none":
        # hflip and rot90^k together generate all 8 dihedral transforms, uniformly.
        steps += [T.RandomHorizontalFlip(), T.RandomChoice([T.RandomRotation((a, a)) for a in (0, 90, 180, 270)])]
    if train and augment == "strong":
        steps += [T.RandomResizedCrop(image_size, scale=STRONG["scale"], ratio=STRONG["ratio"]),
                  T.ColorJitter(STRONG["brightness"], STRONG["contrast"], STRONG["saturation"], STRONG["hue"])]
    steps += [T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])]
    return T.Compose(steps)
