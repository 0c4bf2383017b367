"""Image files for `bdm upscale`: 16-bit, alpha, grayscale, EXIF orientation and ICC round trips."""

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps
from skimage import data

from bdm.errors import BdmError
from bdm.runtime.image_io import check_output, read_image, write_image


@pytest.fixture(scope="module")
def photo():
    return data.astronaut()[60:92, 150:190]  # (32, 40, 3) uint8, a real photo


@pytest.fixture(scope="module")
def srgb_icc():
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _float(pixels, bits):
    return pixels.astype(np.float32) / (2 ** bits - 1)


def test_16bit_rgb_png_keeps_16_bits_in_and_out(tmp_path, photo, srgb_icc):
    deep = photo.astype(np.uint16) * 256 + np.arange(40, dtype=np.uint16)[:, None]  # the low byte matters
    path = tmp_path / "deep.png"
    write_image(path, _float(deep, 16), None, False, 16, srgb_icc)
    assert Image.open(path).mode == "RGB"  # what Pillow would have given: 8 bits; we must not use that
    picture = read_image(path)
    assert picture.bits == 16 and not picture.grayscale and picture.alpha is None
    assert picture.icc_profile == srgb_icc
    assert np.array_equal(np.round(picture.rgb * 65535).astype(np.uint16), deep)


def test_16bit_tiff_with_alpha_round_trip(tmp_path, photo):
    import tifffile

    rgba = np.concatenate([photo, photo[..., :1]], axis=2).astype(np.uint16) * 257
    path = tmp_path / "in.tif"
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"])
    picture = read_image(path)
    assert picture.bits == 16 and picture.alpha is not None
    assert np.array_equal(np.round(picture.alpha * 65535).astype(np.uint16), rgba[..., 3])
    out = tmp_path / "out.tif"
    write_image(out, picture.rgb, picture.alpha, False, 16, None)
    assert np.array_equal(tifffile.imread(out), rgba)


def test_rgba_png_alpha_is_split_and_reattached(tmp_path, photo):
    alpha = np.tile(np.linspace(0, 255, photo.shape[1]).astype(np.uint8), (photo.shape[0], 1))
    path = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([photo, alpha]), "RGBA").save(path)
    picture = read_image(path)
    assert np.array_equal(np.round(picture.rgb * 255).astype(np.uint8), photo)
    assert np.array_equal(np.round(picture.alpha * 255).astype(np.uint8), alpha)
    out = tmp_path / "back.png"
    write_image(out, picture.rgb, picture.alpha, False, 8, None)
    assert np.array_equal(np.asarray(Image.open(out)), np.dstack([photo, alpha]))
    with pytest.raises(BdmError, match="JPEG has no alpha"):
        check_output(tmp_path / "x.jpg", has_alpha=True)


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grayscale_is_replicated_for_the_network_and_written_gray(tmp_path, photo, mode):
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    pixels = gray if mode == "L" else np.dstack([gray, gray[::-1]])
    path = tmp_path / f"{mode}.png"
    Image.fromarray(pixels, mode).save(path)
    picture = read_image(path)
    assert picture.grayscale and picture.rgb.shape == gray.shape + (3,)
    assert np.array_equal(picture.rgb[..., 0], picture.rgb[..., 2])
    out = tmp_path / f"{mode}_out.png"
    write_image(out, picture.rgb, picture.alpha, True, 8, None)
    written = Image.open(out)
    assert written.mode == mode and np.array_equal(np.asarray(written), pixels)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(tmp_path, photo, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(photo).save(path, exif=exif, quality=100)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    picture = read_image(path)
    assert np.array_equal(np.round(picture.rgb * 255).astype(np.uint8), expected)


def test_icc_profile_survives_8bit_png_and_jpeg(tmp_path, photo, srgb_icc):
    for name in ("a.png", "a.jpg"):
        path = tmp_path / name
        Image.fromarray(photo).save(path, icc_profile=srgb_icc)
        picture = read_image(path)
        assert picture.icc_profile == srgb_icc and picture.bits == 8
        out = tmp_path / f"out_{name}"
        write_image(out, picture.rgb, None, False, 8, picture.icc_profile)
        assert Image.open(out).info.get("icc_profile") == srgb_icc


def test_unreadable_inputs_name_the_file(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png")
    with pytest.raises(BdmError, match=r"cannot read .*junk.png: not a readable image"):
        read_image(junk)
    with pytest.raises(BdmError, match=r"cannot read .*missing.png: no such file"):
        read_image(tmp_path / "missing.png")
