"""Image attachments: validated by decoding them, before any runner sees them.

The chat and the HTTP API call `validate_image_data_url` (or
`validate_image_bytes` for an uploaded file) and keep the returned
`ValidatedImage.data_url`; runners then take `ChatMessage.images` as they are.
Only PNG, JPEG, WebP and GIF are accepted, at most `settings.IMAGE_MAX_BYTES`
(decoded) and `MAX_PIXELS` pixels. Every failure is a
`RunnerError(INVALID_INPUT, ...)` whose message says what is wrong and what
is accepted.

An image is re-encoded (same format, except CMYK/16-bit/odd modes which
become PNG or JPEG) only when sending it as uploaded would be wrong: its
EXIF says it is rotated (the model would see it sideways) or it carries EXIF
metadata (camera GPS position must not leave the server), or its pixel mode
is one vision servers commonly reject. Otherwise the original bytes are kept,
with the data URL's MIME type corrected to the real format.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from django.conf import settings

from PIL import Image, ImageOps, UnidentifiedImageError

from runners.base import ErrorCode, RunnerError

FORMATS: dict[str, str] = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
ACCEPTED = "PNG, JPEG, WebP or GIF"
# 40 megapixels: far above what vision models use, far below a decompression bomb.
MAX_PIXELS = 40_000_000
_SAFE_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ValidatedImage:
    """An image that decoded cleanly, as a data URL ready for a runner."""

    data_url: str
    mime_type: str
    width: int
    height: int
    size_bytes: int
    reencoded: bool = False


def _invalid(message: str) -> RunnerError:
    return RunnerError(ErrorCode.INVALID_INPUT, message)


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def _limit() -> int:
    return int(settings.IMAGE_MAX_BYTES)


def validate_image_data_url(data_url: str, *, max_bytes: int | None = None) -> ValidatedImage:
    """Decode and check a `data:image/...;base64,...` URL (see the module doc)."""
    max_bytes = max_bytes or _limit()
    if not isinstance(data_url, str) or not data_url.startswith("data:"):
        raise _invalid(
            "Images must be sent as base64 data URLs (data:image/png;base64,...); "
            "links to images are not fetched."
        )
    header, sep, payload = data_url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise _invalid(
            "The image data URL is not base64-encoded (expected data:image/...;base64,)."
        )
    declared = header[len("data:") : -len(";base64")].strip().lower()
    if declared and not declared.startswith("image/"):
        raise _invalid(f"The attachment is {declared}, not an image; send a {ACCEPTED} image.")
    payload = "".join(payload.split())
    # Refuse before decoding: base64 is 4 characters per 3 bytes.
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise _invalid(
            f"The image is about {_mb(len(payload) * 3 // 4)}; the limit is {_mb(max_bytes)}."
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("The image data URL is not valid base64.") from None
    return validate_image_bytes(data, max_bytes=max_bytes)


def validate_image_bytes(data: bytes, *, max_bytes: int | None = None) -> ValidatedImage:
    """Decode and check raw image bytes (an uploaded file); see the module doc."""
    max_bytes = max_bytes or _limit()
    if not data:
        raise _invalid("The image is empty.")
    if len(data) > max_bytes:
        raise _invalid(f"The image is {_mb(len(data))}; the limit is {_mb(max_bytes)}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format or ""
            if fmt not in FORMATS:
                raise _invalid(
                    f"Only {ACCEPTED} images are accepted (this one is {fmt or 'unknown'})."
                )
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise _invalid(
                    f"The image is {width}x{height} pixels; at most {MAX_PIXELS // 1_000_000} "
                    "megapixels are accepted."
                )
            image.load()  # a full decode: catches truncated and corrupt files
    except RunnerError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise _invalid("The image has too many pixels to be processed safely.") from None
    except UnidentifiedImageError:
        raise _invalid(
            f"The attachment is not a readable image; send a {ACCEPTED} image."
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _invalid(
            f"The image could not be decoded ({exc}); it may be truncated or corrupt."
        ) from None

    if _needs_reencoding(image):
        data, fmt = _reencode(image, fmt)
        width, height = Image.open(io.BytesIO(data)).size
        if len(data) > max_bytes:
            raise _invalid(f"The image is {_mb(len(data))}; the limit is {_mb(max_bytes)}.")
        reencoded = True
    else:
        reencoded = False
    mime = FORMATS[fmt]
    encoded = base64.b64encode(data).decode("ascii")
    return ValidatedImage(
        data_url=f"data:{mime};base64,{encoded}",
        mime_type=mime,
        width=width,
        height=height,
        size_bytes=len(data),
        reencoded=reencoded,
    )


def _needs_reencoding(image: Image.Image) -> bool:
    if image.mode not in _SAFE_MODES:
        return True
    if getattr(image, "is_animated", False):
        return False  # re-encoding would drop frames; GIF/WebP animations pass as they are
    return bool(image.getexif())


def _reencode(image: Image.Image, fmt: str) -> tuple[bytes, str]:
    """Upright, metadata-free, in a mode vision servers take."""
    image = ImageOps.exif_transpose(image)
    if image.mode not in _SAFE_MODES:
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        if fmt == "JPEG" and image.mode == "RGBA":
            fmt = "PNG"
        if fmt == "GIF":
            fmt = "PNG"  # GIF cannot hold RGB without quantising
    out = io.BytesIO()
    options: dict = {}
    if fmt == "JPEG":
        if image.mode not in {"L", "RGB"}:
            image = image.convert("RGB")
        options = {"quality": 92}
    elif fmt == "WEBP":
        options = {"quality": 92}
    # No exif= / icc_profile= passed: the metadata is left behind on purpose.
    image.save(out, format=fmt, **options)
    return out.getvalue(), fmt
