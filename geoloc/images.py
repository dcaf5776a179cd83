"""Safe image decoding: every image becomes RGB with EXIF orientation applied, or an ImageError.

:func:`load_image` fully decodes the file inside the call (so a truncated or damaged file
fails here, not later in a data loader), refuses decompression bombs before any pixel is
allocated, and converts every mode Pillow can open to 8-bit RGB:

- 16-bit grey (``I;16*``) is scaled to 8 bit (``v / 257``), not clipped; 32-bit ``I`` and
  ``F`` are scaled from 16 bit / ``[0, 1]`` when their range says so, else clipped to 0..255;
- images with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) are
  composited on :data:`BACKGROUND_RGB`, the ImageNet mean colour, which normalises to ~0;
- ``CMYK`` (Adobe-inverted or not), ``YCbCr``, ``1``, ``L`` are converted by Pillow;
- the EXIF orientation tag (0x0112, values 2..8) is applied; a missing or invalid tag means
  "as stored".

With ``max_side`` a JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (``Image.draft``)
when that still leaves at least ``max_side`` pixels on the longest side, then resized down;
the output's longest side is then at most ``max_side`` (never upscaled).
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from geoloc.errors import ImageError

DEFAULT_MAX_PIXELS = 100_000_000
"""Largest image accepted (width x height). Pillow's own ``Image.MAX_IMAGE_PIXELS`` (89.5 MP by
default) also applies: its DecompressionBombWarning is treated as an error, so the effective
limit is the smaller of the two."""

MIN_SIDE = 16
"""Smallest accepted width and height in pixels: smaller is not a usable photo (icons,
tracking pixels, placeholders)."""

MAX_FILE_BYTES = 1 << 30
"""Largest image file read (1 GiB): bigger is not one photo, and the read stays bounded."""

BACKGROUND_RGB = (124, 116, 104)
"""Colour transparent pixels are composited on: the ImageNet mean, i.e. ~0 after normalisation."""

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _sniff(fh) -> str:
    """A short human guess at what a file (an open regular file) that Pillow cannot identify actually is."""
    try:
        fh.seek(0)
        head = fh.read(64)
    except (OSError, ValueError) as err:
        return f"cannot read file ({_one_line(err)})"
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace").strip()
        if brand in ("heic", "heix", "hevc", "hevx", "heim", "heis", "mif1", "msf1"):
            return (f"HEIC/HEIF image (brand {brand!r}): no decoder is installed; convert it to JPEG "
                    "or install the pillow-heif plugin")
        if brand in ("avif", "avis"):
            return f"AVIF image (brand {brand!r}): no AVIF decoder is available in this Pillow; convert it to JPEG"
        return f"ISO-BMFF file (brand {brand!r}, e.g. HEIC/AVIF/MP4) that Pillow cannot decode; convert it to JPEG"
    if head.startswith(b"\xff\xd8"):
        return "damaged JPEG (valid start marker but unreadable header)"
    if head.startswith(b"\x89PNG"):
        return "damaged PNG (valid signature but unreadable header)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "not an image: the file holds text"
    return f"not a recognised image format (first bytes {head[:8].hex(' ')})"


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded Pillow image -> 8-bit RGB (see the module docstring for the rules)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if mode.startswith("I;16"):
            a = a.astype(np.float64) / 257.0
        elif mode == "I":
            a = a.astype(np.float64)
            a = a / 257.0 if a.max(initial=0) > 255 else a
        else:  # F
            a = a.astype(np.float64)
            finite = a[np.isfinite(a)]
            if finite.size and finite.min() >= 0 and finite.max() <= 1.0:
                a = a * 255.0
            a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im.convert("RGB")


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        value = int(value)
    except Exception:  # noqa: BLE001 - unreadable EXIF: take the pixels as stored
        return 1
    return value if value in _TRANSPOSE else 1


def load_image(
    path: str | Path,
    *,
    max_side: int | None = None,
    short_side: int | None = None,
    max_pixels: int | None = None,
    min_side: int = MIN_SIDE,
) -> Image.Image:
    """Decode ``path`` to an RGB PIL image with EXIF orientation applied.

    Args:
        path: an image file of any format Pillow decodes (JPEG, PNG, WebP, TIFF, BMP...).
        max_side: if set, the longest side of the result is at most this (JPEGs are decoded
            at reduced scale, much faster for big photos); never upscales. None: full size.
        short_side: if set, a JPEG is decoded at the largest libjpeg reduction (1/2, 1/4, 1/8)
            that keeps its short side at least this long, with no further resampling: what a
            model input resized to that short side needs, at a fraction of the decoding cost.
        max_pixels: largest accepted ``width * height`` (default :data:`DEFAULT_MAX_PIXELS`).
        min_side: smallest accepted width and height (default :data:`MIN_SIDE`).
    Returns:
        A fully decoded ``RGB`` image, ``[H x W x 3]`` uint8 as an array.
    Raises:
        ImageError: ``"<path>: <problem>"``, one line, for anything that is not a usable image
            (missing, empty, truncated, unknown or unsupported format, too large, too small).
    """
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    fh = open_image_file(path)
    with fh:
        return _decode(fh, path, limit=limit, max_side=max_side, short_side=short_side, min_side=min_side)


def open_image_file(path: str | Path):
    """Open ``path`` (binary) only when it is a non-empty regular file of at most :data:`MAX_FILE_BYTES`.

    Opened non-blocking and checked with ``fstat`` on the descriptor, so a FIFO, a device or a
    socket named ``.jpg`` is an :class:`ImageError` at once, never a hang. For any reader of image
    files (EXIF included): ``with open_image_file(p) as fh: Image.open(fh)``.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageError(path, "not a regular file (a directory)") from None
    except OSError as err:
        raise ImageError(path, f"cannot read file ({_one_line(err)})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket")
            raise ImageError(path, f"not a regular file ({kind})")
        if st.st_size == 0:
            raise ImageError(path, "empty file (0 bytes)")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(path, f"file is {st.st_size / 1e6:.0f} MB, above the {MAX_FILE_BYTES / 1e6:.0f} MB "
                                   "accepted for one image")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode(fh, path: str | Path, *, limit: int, max_side: int | None, short_side: int | None,
            min_side: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fh) as im:
                w, h = im.size
                if w * h > limit:
                    raise ImageError(path, f"image is {w}x{h} = {w * h / 1e6:.0f} MP, above the limit of "
                                           f"{limit / 1e6:.0f} MP (possible decompression bomb; raise max_pixels if intended)")
                if w < min_side or h < min_side:
                    raise ImageError(path, f"image is {w}x{h}, too small (minimum {min_side} px per side)")
                if short_side is not None and im.format == "JPEG" and min(w, h) > short_side:
                    s = short_side / min(w, h)
                    im.draft(im.mode if im.mode in ("RGB", "L") else None,
                             (max(1, int(np.ceil(w * s))), max(1, int(np.ceil(h * s)))))
                elif max_side is not None and im.format == "JPEG" and max(w, h) > max_side:
                    s = max_side / max(w, h)
                    im.draft(im.mode if im.mode in ("RGB", "L") else None,
                             (max(1, int(np.ceil(w * s))), max(1, int(np.ceil(h * s)))))
                im.load()
                orientation = _orientation(im)
                out = _to_rgb(im)
                if max_side is not None and max(out.size) > max_side:
                    s = max_side / max(out.size)
                    size = (max(1, round(out.size[0] * s)), max(1, round(out.size[1] * s)))
                    out = out.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
                for op in _TRANSPOSE.get(orientation, ()):
                    out = out.transpose(op)
                if out is im:
                    out = im.copy()  # detach from the file object closed on exit
                return out
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(path, f"image too large, refused as a possible decompression bomb ({_one_line(err)})") from None
    except Image.DecompressionBombWarning as err:
        raise ImageError(path, f"image too large, refused as a possible decompression bomb ({_one_line(err)})") from None
    except UnidentifiedImageError:
        raise ImageError(path, _sniff(fh)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        msg = _one_line(err)
        if "truncated" in msg.lower() or isinstance(err, EOFError):
            raise ImageError(path, f"truncated or damaged image data ({msg})") from None
        raise ImageError(path, f"cannot decode image ({type(err).__name__}: {msg})") from None
    except MemoryError:
        raise ImageError(path, "not enough memory to decode the image") from None
    except Exception as err:  # noqa: BLE001 - any other decoder failure is a bad image
        raise ImageError(path, f"cannot decode image ({type(err).__name__}: {_one_line(err)})") from None
