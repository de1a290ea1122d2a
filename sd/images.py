"""Images in and out: tensors <-> PIL, reading a photo, writing atomically, grids, heat maps."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sd.files import atomic_write


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> PIL images, rounding as diffusers' numpy_to_pil does."""
    arrays = (images.float().permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def open_image(path: str | Path) -> Image.Image:
    """The image at `path`, decoded; a ValueError naming the path for every way that fails: no
    such file, not an image, truncated, or a header claiming more pixels than Pillow's bomb
    limit (a 69-byte PNG can claim 30000x30000)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: the image claims more pixels than this program reads "
                         f"({Image.MAX_IMAGE_PIXELS * 2:,} at most): {e}") from e
    except FileNotFoundError as e:
        raise ValueError(f"{path}: no such file") from e
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some headers
        raise ValueError(f"{path}: cannot be read as an image ({e})") from e


def load_image(image: "Image.Image | str | Path", height: int, width: int) -> torch.Tensor:
    """Open, apply EXIF orientation, convert to RGB, resize to cover and centre-crop: [1,3,H,W]."""
    if height % 64 or width % 64:
        raise ValueError(f"image size must be a multiple of 64, got {height}x{width}")
    if not isinstance(image, Image.Image):
        image = open_image(image)
    image = ImageOps.fit(rgb(image), (width, height), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255


def rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, then 8-bit RGB from any mode (palette, RGBA, CMYK, L, ...).
    PIL's convert clips 16-bit greyscale ("I;16", 0..65535) to 255, white: scale it first."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 65535 / 257 = 255
        image = Image.fromarray((np.asarray(image) / 257).round().clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def fit_warning(size: tuple[int, int], height: int, width: int) -> str | None:
    """What load_image's resize-and-crop of an image of `size` (w, h) loses, if it is a lot."""
    w, h = size
    scale = max(width / w, height / h)
    kept = (width * height) / (w * h * scale**2)  # the share of the image the crop keeps
    if scale > 4:
        return f"it is {w}x{h}, scaled up {scale:.3g}x to {width}x{height}: use a larger image"
    if kept < 0.25:
        return f"it is {w}x{h}: a {width}x{height} crop keeps {kept:.1%}: crop it yourself first"
    return None


def image_format(path: Path) -> str:
    """The PIL format that `path`'s extension names; a ValueError for an unknown extension."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{path}: unknown image extension {path.suffix!r}; use .png or .jpg")
    return fmt


def save_image(image: Image.Image, path: str | Path) -> None:
    """Write atomically in the format the extension names: a killed run never leaves half a file."""
    fmt = image_format(Path(path))
    with atomic_write(path) as tmp:
        image.save(tmp, format=fmt)


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Images of one size pasted in rows."""
    w, h = rows[0][0].size
    out = Image.new("RGB", (w * len(rows[0]), h * len(rows)))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            out.paste(im, (c * w, r * h))
    return out


def overlay(image: Image.Image, heat: torch.Tensor) -> Image.Image:
    """The image darkened, with the [0, 1] heat map in warm colours on top."""
    h = np.asarray(Image.fromarray((heat.numpy() * 255).astype(np.uint8)).resize(
        image.size, Image.Resampling.BILINEAR), dtype=np.float32)[..., None] / 255
    colour = np.concatenate([np.clip(2 * h, 0, 1), np.clip(2 * h - 1, 0, 1), 0 * h], axis=-1)
    mixed = 0.4 * np.asarray(image, dtype=np.float32) / 255 + 0.6 * colour
    return Image.fromarray((mixed * 255).round().astype(np.uint8))


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0,
         where: torch.Tensor | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image of a batch [..., C, H, W] with values in
    [0, peak] (inf where the two are equal), over the pixels where `where` [H, W] is true if
    given. The error is summed in float64, so equal inputs give inf and not a rounding error."""
    err = (a.detach().double().cpu() - b.detach().double().cpu()).pow(2).mean(-3)
    mse = (err[..., where] if where is not None else err.flatten(-2)).mean(-1)
    return 10 * torch.log10(peak**2 / mse)
