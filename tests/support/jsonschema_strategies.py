"""`from_schema`: Hypothesis strategies for values valid against a JSON Schema,
from hypothesis-jsonschema (the maintained library the fuzz suites use).

hypothesis-jsonschema 0.23.1, its newest release, builds objects with
Hypothesis' private `many` helper as `while elements.more(): ...`; Hypothesis
6.170 replaced `more()` by iteration (`with many(...) as e: for _ in e:`).
`_Many` below gives the library the old spelling on top of the new one, step
for step the same draws. Remove it once a release of hypothesis-jsonschema
speaks the new API (the import fails loudly if `many` changes again).
"""

from __future__ import annotations

from types import SimpleNamespace

import hypothesis_jsonschema._from_schema as _library
from hypothesis.internal.conjecture import utils as _cu
from hypothesis_jsonschema import from_schema

__all__ = ["from_schema"]


class _Many:
    def __init__(self, *args, **kwargs) -> None:
        self._many = _cu.many(*args, **kwargs).__enter__()
        self._steps = iter(self._many)

    def more(self) -> bool:
        if next(self._steps, False) is None:
            return True
        self._many.__exit__(None, None, None)
        return False

    def reject(self, why: str | None = None) -> None:
        self._many.reject(why)


if not hasattr(_cu.many, "more"):
    _library.cu = SimpleNamespace(**{**vars(_cu), "many": _Many})
