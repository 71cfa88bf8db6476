"""Declaring what the interfaces send as pydantic models, the same way in every
app: api/schemas.py's response bodies and chat/server_frames.py's websocket
frames (both documented in the OpenAPI document, api/openapi.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field, create_model


def declare(name: str, base: Any, doc: str | None = None, /, **fields: Any) -> Any:
    """A model `name` with `base` (a class or a tuple of them) and `fields`:
    each a type (required) or a (type, default-or-Field) pair, as `about` makes."""
    spec = {key: kind if isinstance(kind, tuple) else (kind, ...) for key, kind in fields.items()}
    return create_model(name, __base__=base, __doc__=doc, **spec)


def about(kind: Any, description: str, default: Any = ...) -> tuple[Any, Any]:
    """A field with a description."""
    return kind, Field(default, description=description)


def one_of(values: Iterable[str]) -> Any:
    """A Literal of these values (a Django TextChoices' `.values`, an enum, a tuple)."""
    return Literal[tuple(str(value) for value in values)]
