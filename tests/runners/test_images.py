"""Image attachments are checked by decoding them, with a clear error for each way they fail."""

from __future__ import annotations

import base64
import io

from django.test import override_settings

import pytest
from PIL import Image

from runners.base import ErrorCode, RunnerError
from runners.images import MAX_PIXELS, validate_image_bytes, validate_image_data_url


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def decoded(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def refused(call, *args, **kwargs) -> RunnerError:
    with pytest.raises(RunnerError) as info:
        call(*args, **kwargs)
    assert info.value.code is ErrorCode.INVALID_INPUT and not info.value.retryable
    return info.value


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_each_accepted_format_passes_unchanged(fmt, mime):
    original = encode(Image.new("RGB", (16, 9), (10, 120, 200)), fmt)
    image = validate_image_data_url(data_url(original, mime))
    assert image.mime_type == mime
    assert (image.width, image.height) == (16, 9)
    assert not image.reencoded
    assert image.data_url == data_url(original, mime)  # the very same bytes


def test_a_wrong_declared_type_is_corrected_to_the_real_one():
    jpeg = encode(Image.new("RGB", (4, 4)), "JPEG")
    image = validate_image_data_url(data_url(jpeg, "image/png"))
    assert image.mime_type == "image/jpeg"
    assert image.data_url.startswith("data:image/jpeg;base64,")


def test_other_formats_are_refused_naming_what_is_accepted():
    bmp = encode(Image.new("RGB", (4, 4)), "BMP")
    error = refused(validate_image_data_url, data_url(bmp, "image/bmp"))
    assert "PNG, JPEG, WebP or GIF" in error.message and "BMP" in error.message


def test_bytes_that_are_not_an_image_are_refused():
    error = refused(validate_image_bytes, b"%PDF-1.7 definitely not an image")
    assert "not a readable image" in error.message


def test_a_truncated_image_is_refused_as_corrupt():
    png = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    error = refused(validate_image_bytes, png[: len(png) // 2])
    assert "truncated or corrupt" in error.message


def test_an_image_over_the_size_limit_is_refused_with_both_sizes():
    noisy = encode(Image.effect_noise((300, 300), 100).convert("RGB"), "PNG")
    with override_settings(IMAGE_MAX_BYTES=len(noisy) - 1):
        error = refused(validate_image_data_url, data_url(noisy))
        assert "the limit is" in error.message and "MB" in error.message
        error = refused(validate_image_bytes, noisy)
        assert "the limit is" in error.message


def test_a_huge_data_url_is_refused_before_it_is_decoded():
    error = refused(validate_image_data_url, "data:image/png;base64," + "A" * 4000, max_bytes=1024)
    assert error.message.startswith("The image is about")  # sized from the base64 length


def test_too_many_pixels_is_refused():
    side = int(MAX_PIXELS**0.5) + 10
    png = encode(Image.new("1", (side, side)), "PNG")  # tiny file, huge canvas
    error = refused(validate_image_bytes, png, max_bytes=50 * 1024 * 1024)
    assert f"{side}x{side} pixels" in error.message and "megapixels" in error.message


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        ("https://example.com/cat.png", "data URLs"),
        ("data:image/png,notbase64", "not base64-encoded"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:image/png;base64,", "empty"),
    ],
)
def test_malformed_data_urls_get_a_specific_message(url, phrase):
    assert phrase in refused(validate_image_data_url, url).message


def test_exif_metadata_is_stripped_and_the_image_turned_upright():
    image = Image.new("RGB", (40, 20), (250, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    exif[0x010F] = "PhoneMaker"  # camera make: metadata that must not leave the server
    jpeg = encode(image, "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(jpeg)).getexif()
    result = validate_image_bytes(jpeg)
    assert result.reencoded and result.mime_type == "image/jpeg"
    clean = decoded(result.data_url)
    assert not clean.getexif()
    assert clean.size == (20, 40) == (result.width, result.height)


def test_a_cmyk_jpeg_is_re_encoded_to_rgb():
    cmyk = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")
    result = validate_image_bytes(cmyk)
    assert result.reencoded
    assert decoded(result.data_url).mode == "RGB"


def test_a_sixteen_bit_png_is_re_encoded_to_a_common_mode():
    deep = encode(Image.new("I;16", (8, 8), 40000), "PNG")
    result = validate_image_bytes(deep)
    assert result.reencoded and result.mime_type == "image/png"
    assert decoded(result.data_url).mode in {"RGB", "RGBA", "L"}


def test_an_animated_gif_keeps_its_frames():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    result = validate_image_bytes(buffer.getvalue())
    assert not result.reencoded
    assert decoded(result.data_url).n_frames == 3
