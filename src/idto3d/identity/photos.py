"""Load user photos robustly: any common format, EXIF orientation applied, always 8-bit RGB."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from idto3d.core.errors import IdtoError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
PAPER_MAX_PHOTOS = 5  # the paper conditions on 1 to 5 photos (sections 3.2 and A)


class PhotoError(IdtoError):
    """A photo path is missing, empty, or not a readable image."""


def collect_photos(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (non-recursive, sorted) into a list of photo files.

    Every path is checked here, before any model is loaded, so a typo fails at once.
    """
    if not inputs:
        raise PhotoError("no photos given; pass 1 to 5 photo files or a folder of photos")
    photos: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PhotoError(f"folder {path} has no images ({', '.join(IMAGE_SUFFIXES)})")
            photos += found
        elif path.is_file():
            photos.append(path)
        elif path.exists():
            raise PhotoError(f"{path} is neither a file nor a folder")
        else:
            raise PhotoError(f"photo not found: {path}")
    for p in photos:
        if p.stat().st_size == 0:
            raise PhotoError(f"{p} is an empty file")
    return photos


@contextmanager
def _decode_errors(path: Path) -> Iterator[None]:
    """PIL's decode exceptions -> one actionable PhotoError line."""
    try:
        yield
    except UnidentifiedImageError:
        raise PhotoError(f"{path} is not an image that can be read (use JPEG, PNG, WebP or BMP)") from None
    except Image.DecompressionBombError:
        raise PhotoError(f"{path} is too large to decode safely; downscale it below ~100 megapixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise PhotoError(f"{path} is damaged or truncated: {exc}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/float greyscale: PIL's direct RGB conversion clips, so rescale to 8 bits first.
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.round().astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels become white, not whatever colour the encoder left under them.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_photo(path: str | Path) -> np.ndarray:
    """Read a photo as an ``HxWx3`` uint8 RGB array, upright (EXIF orientation applied)."""
    path = Path(path)
    if not path.is_file():
        raise PhotoError(f"photo not found: {path}")
    if path.stat().st_size == 0:
        raise PhotoError(f"{path} is an empty file")
    with _decode_errors(path), Image.open(path) as im:
        im.seek(0)  # first frame of animated GIF/WebP/multi-page TIFF
        arr = np.asarray(_to_rgb(ImageOps.exif_transpose(im)), dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[0] < 8 or arr.shape[1] < 8:
        raise PhotoError(f"{path} is too small ({arr.shape[1]}x{arr.shape[0]} px) to hold a face")
    return np.ascontiguousarray(arr)


def probe_photo(path: str | Path) -> tuple[int, int]:
    """Read only the header: (width, height). Catches non-images before any model is loaded."""
    with _decode_errors(Path(path)), Image.open(path) as im:
        return im.size


def downscale(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink so the longer side is at most ``max_side``; returns the image and the scale applied (<= 1)."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return image, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
    # The true per-axis scale after rounding; the mean keeps box mapping within a pixel.
    return np.ascontiguousarray(small), (size[0] / w + size[1] / h) / 2.0
