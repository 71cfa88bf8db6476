"""Model fields the apps declare the same way."""

from __future__ import annotations

from typing import Any

from django.db import models


def optional_link(to: Any, **options: Any) -> models.ForeignKey:
    """A foreign key that may be empty: NULL in the database, blank in forms
    (`on_delete`, `related_name` and `help_text` as for any ForeignKey)."""
    return models.ForeignKey(to, null=True, blank=True, **options)
