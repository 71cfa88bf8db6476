"""Encryption at rest for runner API keys.

The Fernet key is derived from SECRET_KEY. Keys encrypted under an older
SECRET_KEY still decrypt while it is listed in SECRET_KEY_FALLBACKS; saving the
config again (or `manage.py rotate_runner_keys`) re-encrypts them.
"""

from __future__ import annotations

import base64
import hashlib

from django.conf import settings

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


def _fernet(secret: str) -> Fernet:
    digest = hashlib.sha256(b"breezeweb-runner-api-key:" + secret.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def _multi() -> MultiFernet:
    secrets = [settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS]
    return MultiFernet([_fernet(s) for s in secrets])


def encrypt(plain: str) -> str:
    if not plain:
        return ""
    return _multi().encrypt(plain.encode()).decode()


def decrypt(token: str) -> str:
    """The clear key, or "" when it cannot be decrypted (e.g. SECRET_KEY rotated
    without keeping the old one in SECRET_KEY_FALLBACKS)."""
    if not token:
        return ""
    try:
        return _multi().decrypt(token.encode()).decode()
    except InvalidToken:
        return ""


def mask(plain: str) -> str:
    """What the admin shows of a key: never more than its last two characters."""
    if not plain:
        return ""
    return "••••••••" + plain[-2:] if len(plain) > 8 else "••••••••"
