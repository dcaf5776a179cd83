"""Safe image decoding: every image becomes RGB with EXIF orientation applied, or an ImageError."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from geoloc.errors import ImageError


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` to an RGB PIL image with EXIF orientation applied.

    Raises:
        ImageError: naming the file and the problem, for anything that is not a usable image.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad image
        raise ImageError(path, f"cannot decode image ({type(err).__name__}: {err})") from None
