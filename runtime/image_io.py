"""Image files in and out of `bdm upscale`: 8/16-bit, grayscale, alpha, EXIF orientation, ICC profile.

Reading gives a `Picture`: float32 RGB in [0, 1] for the network, the alpha channel apart (upscaled
bicubically and re-attached by the caller), and what is needed to write the result back the same way
(grayscale or colour, bit depth, ICC profile). The EXIF orientation is applied to the pixels, so outputs
carry no orientation tag.

Readers: Pillow for PNG/JPEG/WebP metadata and 8-bit pixels; pypng for 16-bit PNG pixels (Pillow silently
reads 16-bit RGB PNGs as 8-bit; it is used only for their metadata); tifffile for TIFF (pixels and tags).
Writers: Pillow for 8-bit files, pypng for 16-bit PNG (with an iCCP chunk), tifffile for TIFF.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from bdm.errors import BdmError
from bdm.files import atomic_path

INPUT_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff"}
OUTPUT_FORMATS = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp", "tiff": ".tif", "tif": ".tif"}
_EIGHT_BIT_ONLY = {".jpg", ".jpeg", ".webp"}

# ITU-R BT.601 luma, the weights Pillow's convert("L") uses: a grayscale input is written back as gray.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_EXIF_ORIENTATION = 0x0112
_TIFF_ICC = 34675


@dataclass
class Picture:
    """One decoded image. rgb: float32 (H, W, 3) in [0, 1]; alpha: float32 (H, W) or None."""

    rgb: np.ndarray
    alpha: Optional[np.ndarray]
    grayscale: bool
    bits: int
    icc_profile: Optional[bytes]

    @property
    def size(self):
        return self.rgb.shape[:2]


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an (H, W[, C]) array: the image as it is meant to be seen."""
    if orientation in (5, 6, 7, 8):
        array = array.swapaxes(0, 1)                               # transpose first ...
    flip_rows, flip_cols = {1: (0, 0), 2: (0, 1), 3: (1, 1), 4: (1, 0),
                            5: (0, 0), 6: (0, 1), 7: (1, 1), 8: (1, 0)}.get(orientation, (0, 0))
    if flip_rows:                                                  # ... then mirror
        array = array[::-1]
    if flip_cols:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


def _split(pixels: np.ndarray, bits: int, icc: Optional[bytes]) -> Picture:
    """Integer (H, W[, C]) pixels, C in 1..4, -> Picture (gray is replicated to RGB for the network)."""
    scale = np.float32(2 ** bits - 1)
    values = pixels.astype(np.float32) / scale
    if values.ndim == 2:
        values = values[..., None]
    channels = values.shape[2]
    if channels not in (1, 2, 3, 4):
        raise BdmError(f"{channels} channels per pixel")
    grayscale = channels <= 2
    color = values[..., :1].repeat(3, axis=2) if grayscale else values[..., :3]
    alpha = values[..., -1] if channels in (2, 4) else None
    return Picture(np.ascontiguousarray(color), alpha, grayscale, bits, icc)


def _png_bit_depth(path: Path) -> int:
    head = path.open("rb").read(26)
    return head[24] if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" else 0


def _read_png16(path: Path) -> np.ndarray:
    import png

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    pixels = np.array([np.asarray(row, dtype=np.uint16) for row in rows])
    return pixels.reshape(height, width, info["planes"])


def _read_tiff(path: Path):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        pixels = series.asarray()
        page = tif.pages[0]
        icc = page.tags.get(_TIFF_ICC)
        orientation = page.tags.get(274)
        axes = series.axes
    if axes == "SYX":                      # planar configuration: channels first
        pixels = np.moveaxis(pixels, 0, -1)
    elif axes not in ("YX", "YXS"):
        raise BdmError(f"a TIFF with axes {axes!r} (pages or volumes); give a single 2-D image")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise BdmError(f"{pixels.dtype} TIFF samples; only 8- and 16-bit unsigned images are supported")
    icc_bytes = bytes(icc.value) if icc is not None else None
    return pixels, 16 if pixels.dtype == np.uint16 else 8, icc_bytes, int(orientation.value) if orientation else 1


def _read_pillow(path: Path, bit_depth: int):
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        icc = img.info.get("icc_profile")
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
        if bit_depth == 16:                # 16-bit PNG: Pillow gives 8 bits for RGB(A); take pixels from pypng
            return _read_png16(path), 16, icc, orientation
        mode = img.mode
        if mode == "CMYK":                 # a CMYK profile does not describe the RGB result
            img, icc = img.convert("RGB"), None
        elif mode not in ("L", "LA", "RGB", "RGBA"):
            has_alpha = "A" in mode or "transparency" in img.info
            img = img.convert("RGBA" if has_alpha else "RGB")
        return np.asarray(img), 8, icc, orientation


def read_image(path) -> Picture:
    """Decode an image file; any failure is a BdmError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise BdmError(f"cannot read {path}: no such file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            pixels, bits, icc, orientation = _read_tiff(path)
        else:
            pixels, bits, icc, orientation = _read_pillow(path, _png_bit_depth(path))
        return _split(_orient(pixels, orientation), bits, icc)
    except BdmError as e:
        raise BdmError(f"cannot read {path}: {e}") from None
    except Exception as e:  # decoders raise many types for a corrupt or non-image file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BdmError(f"cannot read {path}: not a readable image ({reason})") from None


def _iccp_chunk(icc: bytes) -> bytes:
    body = b"ICC profile\x00\x00" + zlib.compress(icc)
    return struct.pack(">I", len(body)) + b"iCCP" + body + struct.pack(">I", zlib.crc32(b"iCCP" + body))


def _png16_bytes(pixels: np.ndarray, icc: Optional[bytes]) -> bytes:
    import png

    height, width, planes = pixels.shape
    writer = png.Writer(width, height, greyscale=planes <= 2, alpha=planes in (2, 4), bitdepth=16)
    buffer = io.BytesIO()
    writer.write(buffer, pixels.reshape(height, width * planes))
    data = buffer.getvalue()
    if icc:
        ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR length+type, IHDR body, CRC: iCCP must precede IDAT
        data = data[:ihdr_end] + _iccp_chunk(icc) + data[ihdr_end:]
    return data


def output_suffix(fmt: str) -> str:
    try:
        return OUTPUT_FORMATS[fmt.lower()]
    except KeyError:
        raise BdmError(f"--format {fmt} is unknown; choose one of {sorted(set(OUTPUT_FORMATS))}") from None


def check_output(path: Path, has_alpha: bool) -> None:
    """Refuse, before any work, an output format that cannot hold the result."""
    suffix = path.suffix.lower()
    if suffix not in set(OUTPUT_FORMATS.values()) | {".jpeg", ".tiff"}:
        raise BdmError(f"cannot write {path}: unknown image suffix {suffix!r}; use .png, .jpg, .webp or .tif")
    if has_alpha and suffix in (".jpg", ".jpeg"):
        raise BdmError(f"cannot write {path}: JPEG has no alpha channel and the input has one; use --format png")


def write_image(path, rgb: np.ndarray, alpha: Optional[np.ndarray], grayscale: bool, bits: int,
                icc_profile: Optional[bytes]) -> Path:
    """Write float32 RGB (+ alpha) in [0, 1] atomically; the format comes from the file suffix.

    16-bit data goes to PNG and TIFF at 16 bits; JPEG and WebP hold 8 bits only.
    """
    from bdm.runtime.preprocess import quantize

    path = Path(path)
    check_output(path, alpha is not None)
    suffix = path.suffix.lower()
    if suffix in _EIGHT_BIT_ONLY:
        bits = 8
    planes = [(rgb @ _LUMA)[..., None] if grayscale else rgb]
    if alpha is not None:
        planes.append(alpha[..., None])
    pixels = quantize(np.concatenate(planes, axis=2), bits)
    if pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    with atomic_path(path) as tmp:
        if suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, pixels, photometric="minisblack" if grayscale else "rgb",
                             extrasamples=["unassalpha"] if alpha is not None else None, iccprofile=icc_profile)
        elif bits == 16:
            data = _png16_bytes(pixels if pixels.ndim == 3 else pixels[..., None], icc_profile)
            tmp.write_bytes(data)
        else:
            from PIL import Image

            options = {"icc_profile": icc_profile} if icc_profile else {}
            if suffix in _EIGHT_BIT_ONLY:
                options["quality"] = 95
            format_name = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}[suffix]
            Image.fromarray(pixels).save(tmp, format=format_name, **options)
    return path
