"""load_image on a corpus of valid and broken files generated at test time."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geoloc.errors import ImageError
from geoloc.images import BACKGROUND_RGB, load_image

from conftest import write_image
from guards import deadline


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _jpeg_bytes(size=(64, 48), **save) -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", **save)
    return buf.getvalue()


# -- the bad corpus: (name, writer) -> must raise ImageError --------------------------------------


def _zero_byte(p: Path) -> None:
    p.write_bytes(b"")


def _truncated_jpeg_half(p: Path) -> None:
    data = _jpeg_bytes((256, 192), quality=95)
    p.write_bytes(data[: len(data) // 2])


def _truncated_jpeg_no_eoi(p: Path) -> None:
    data = _jpeg_bytes((256, 192), quality=95)
    p.write_bytes(data[:-200])


def _truncated_jpeg_header_only(p: Path) -> None:
    p.write_bytes(_jpeg_bytes()[:300])


def _truncated_progressive(p: Path) -> None:
    data = _jpeg_bytes((256, 192), quality=95, progressive=True)
    p.write_bytes(data[: len(data) * 2 // 3])


def _random_bytes_jpg(p: Path) -> None:
    p.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _text_png(p: Path) -> None:
    p.write_text("this is not a picture\nreally not\n")


def _bomb_png(p: Path) -> None:
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 10^10 px RGB, 8 bit
    idat = zlib.compress(b"\x00" * 1024)
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _warn_bomb_png(p: Path) -> None:
    """Between Pillow's warning (89.5 MP) and error (179 MP) thresholds: only a warning in Pillow."""
    ihdr = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 0, 0, 0, 0)  # 100 MP grey
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00")) +
                  _png_chunk(b"IEND", b""))


def _one_by_one(p: Path) -> None:
    Image.new("RGB", (1, 1), (255, 0, 0)).save(p)


def _thin_strip(p: Path) -> None:
    Image.new("RGB", (4000, 8), (255, 0, 0)).save(p)


def _heic(p: Path) -> None:
    p.write_bytes(struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic" + b"\x00" * 64)


def _truncated_png(p: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _jpeg_signature_only(p: Path) -> None:
    p.write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)


BAD = {
    "zero.jpg": (_zero_byte, "empty"),
    "trunc_half.jpg": (_truncated_jpeg_half, "truncated"),
    "trunc_tail.jpg": (_truncated_jpeg_no_eoi, "truncated"),
    "trunc_header.jpg": (_truncated_jpeg_header_only, ""),
    "trunc_progressive.jpg": (_truncated_progressive, "truncated"),
    "random.jpg": (_random_bytes_jpg, "not a recognised image"),
    "text.png": (_text_png, "text"),
    "bomb.png": (_bomb_png, "decompression bomb"),
    "bomb_warning.png": (_warn_bomb_png, "decompression bomb"),
    "tiny.png": (_one_by_one, "too small"),
    "strip.png": (_thin_strip, "too small"),
    "photo.heic": (_heic, "HEIC"),
    "trunc.png": (_truncated_png, ""),
    "jpeg_sig.jpg": (_jpeg_signature_only, "JPEG"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_image_raises_one_line_error_naming_file(tmp_path, name):
    writer, words = BAD[name]
    p = tmp_path / name
    writer(p)
    with pytest.raises(ImageError) as info:
        load_image(p)
    msg = str(info.value)
    assert name in msg and str(p) == info.value.path
    assert "\n" not in msg
    assert words.lower() in msg.lower()


@pytest.mark.parametrize("name", ["trunc_half.jpg", "trunc_tail.jpg", "trunc_progressive.jpg"])
def test_truncated_jpeg_fails_in_reduced_decoding_too(tmp_path, name):
    p = tmp_path / name
    BAD[name][0](p)
    with pytest.raises(ImageError, match="truncated"):
        load_image(p, max_side=32)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")


def test_directory_is_not_an_image(tmp_path):
    (tmp_path / "d.jpg").mkdir()
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path / "d.jpg")


def test_max_pixels_is_configurable(tmp_path):
    p = write_image(tmp_path / "a.png", (100, 100))
    assert load_image(p).size == (100, 100)
    with pytest.raises(ImageError, match="above the limit"):
        load_image(p, max_pixels=5_000)


def test_bomb_never_allocates(tmp_path):
    """A 10^10-pixel header is refused from the header: fast, no MemoryError."""
    p = tmp_path / "bomb.png"
    _bomb_png(p)
    with pytest.raises(ImageError):
        load_image(p, max_pixels=10**12)  # past our limit, Pillow's own error still stops it


# -- the good corpus ---------------------------------------------------------------------------


def test_rgb_jpeg_and_png(tmp_path):
    for name in ("a.jpg", "a.png", "a.webp", "a.tif", "a.bmp"):
        im = load_image(write_image(tmp_path / name, (40, 30)))
        assert im.mode == "RGB" and im.size == (40, 30)


def test_grayscale(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.full((20, 30), 77, np.uint8), "L").save(p)
    a = np.asarray(load_image(p))
    assert a.shape == (20, 30, 3) and (a == 77).all()


def test_bilevel(tmp_path):
    p = tmp_path / "b.png"
    Image.new("1", (20, 20), 1).save(p)
    assert (np.asarray(load_image(p)) == 255).all()


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "c.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(p, quality=100)  # pure red in CMYK
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (32, 32)
    r, g, b = np.asarray(im).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "d.png"
    ramp = np.linspace(0, 65535, 64 * 16).reshape(16, 64).astype(np.uint16)
    Image.fromarray(ramp).save(p)
    assert Image.open(p).mode.startswith("I")
    a = np.asarray(load_image(p))[..., 0].astype(int)
    assert a.shape == (16, 64)
    assert a.min() == 0 and a.max() == 255
    assert np.abs(a - np.rint(ramp / 257)).max() <= 1
    assert len(np.unique(a)) > 200  # a real ramp, not clipped to a few values


def test_16bit_rgb_png(tmp_path):
    # 16-bit RGB PNG crafted by hand (Pillow reads it as 8-bit RGB)
    h, w = 16, 16
    px = np.full((h, w, 3), 0x8000, dtype=">u2")
    raw = b"".join(b"\x00" + px[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    p = tmp_path / "rgb16.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw)) +
                  _png_chunk(b"IEND", b""))
    a = np.asarray(load_image(p))
    assert a.shape == (16, 16, 3) and np.abs(a.astype(int) - 128).max() <= 1


def test_palette_with_alpha_composited(tmp_path):
    p = tmp_path / "p.png"
    im = Image.new("P", (20, 20), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (10, 0, 20, 20))
    im.save(p, transparency=0)  # index 0 (red) transparent, index 1 (blue) opaque
    a = np.asarray(load_image(p))
    assert a.shape == (20, 20, 3)
    assert tuple(a[5, 2]) == BACKGROUND_RGB
    assert tuple(a[5, 15]) == (0, 0, 255)


def test_rgba_composited(tmp_path):
    p = tmp_path / "rgba.png"
    a = np.zeros((20, 20, 4), np.uint8)
    a[..., 0] = 255
    a[:, 10:, 3] = 255
    Image.fromarray(a, "RGBA").save(p)
    out = np.asarray(load_image(p))
    assert tuple(out[0, 0]) == BACKGROUND_RGB and tuple(out[0, 15]) == (255, 0, 0)


def test_exif_orientation_6_rotates(tmp_path):
    """Orientation 6: the stored image must be rotated 90 degrees clockwise to display."""
    w, h = 64, 32
    a = np.zeros((h, w, 3), np.uint8)
    a[:16, :16] = 255  # white block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    Image.fromarray(a).save(p, exif=exif, quality=100)
    out = np.asarray(load_image(p))
    assert out.shape == (w, h, 3)  # W/H swapped
    # rotated clockwise: stored top-left goes to displayed top-right
    assert out[:16, -16:].mean() > 200 and out[:16, :16].mean() < 50
    small = load_image(p, max_side=32)
    assert small.size == (16, 32)


def test_invalid_orientation_value_is_ignored(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 42
    p = tmp_path / "o.jpg"
    Image.new("RGB", (40, 20)).save(p, exif=exif)
    assert load_image(p).size == (40, 20)


def test_wide_panorama(tmp_path):
    p = tmp_path / "pano.jpg"
    Image.new("RGB", (8192, 512), (10, 200, 30)).save(p)
    assert load_image(p).size == (8192, 512)
    assert load_image(p, max_side=1024).size == (1024, 64)


def test_max_side_downscales_jpeg_and_png(tmp_path):
    j = write_image(tmp_path / "big.jpg", (2000, 1500))
    q = write_image(tmp_path / "big.png", (2000, 1500))
    for p in (j, q):
        im = load_image(p, max_side=512)
        assert im.mode == "RGB" and im.size == (512, 384)
        assert load_image(p, max_side=4000).size == (2000, 1500)  # never upscaled
    ref = np.asarray(load_image(j).resize((512, 384), Image.Resampling.BILINEAR), dtype=float)
    fast = np.asarray(load_image(j, max_side=512), dtype=float)
    assert np.abs(ref.mean((0, 1)) - fast.mean((0, 1))).max() < 5  # same picture


def test_multiframe_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("P", (20, 20), i) for i in range(3)]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert load_image(p).size == (20, 20)


def test_real_berlin_photo_draft(shared_data):
    p = shared_data / "berlin" / "images" / "01.jpg"
    full = load_image(p)
    assert full.size == (3264, 2448) and full.mode == "RGB"
    small = load_image(p, max_side=512)
    assert small.size == (512, 384)


def test_short_side_decodes_jpeg_at_reduced_scale_keeping_enough_pixels(tmp_path):
    from PIL import Image as _Image

    p = tmp_path / "big.jpg"
    _Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8)).save(p, quality=90)
    # 1/4 scale keeps a 375-px short side (>= 256); 1/8 would give 187 px, too few
    assert load_image(p, short_side=256).size == (500, 375)
    assert load_image(p, short_side=1500).size == (2000, 1500)  # no reduction possible: full size
    png = tmp_path / "big.png"
    _Image.open(p).save(png)
    assert load_image(png, short_side=256).size == (2000, 1500)  # only JPEG has reduced-scale decoding


def test_a_fifo_named_jpg_is_refused_at_once(tmp_path):
    import os

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    with deadline(5), pytest.raises(ImageError, match="not a regular file.*FIFO"):
        load_image(fifo)


def test_a_link_to_a_device_is_refused_without_reading(tmp_path):
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")
    with deadline(5), pytest.raises(ImageError, match="not a regular file.*device"):
        load_image(link)


def test_open_image_file_only_opens_regular_files(tmp_path):
    from geoloc.images import open_image_file

    good = tmp_path / "a.png"
    Image.new("RGB", (20, 20)).save(good)
    with open_image_file(good) as fh:
        assert fh.read(4) == b"\x89PNG"
    with pytest.raises(ImageError, match="directory"):
        open_image_file(tmp_path)
