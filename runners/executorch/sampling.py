"""Choosing the next token from the program's logits (the local runner's own
decode loop, see runner.py).

Order per token, as llama.cpp and OpenAI apply them:

1. `logit_bias` is added (token id -> bias; -100 bans a token, +100 forces it).
2. Penalties over the answer's own last `penalty_window` tokens (never the
   prompt: a grounded answer must be free to repeat the words of its sources):
   - `repetition_penalty` (llama.cpp / Hugging Face): a token seen in the
     window has its logit divided by the penalty when positive, multiplied
     when negative (1.0 = off);
   - `frequency_penalty` (OpenAI): minus penalty x times seen (0 = off);
   - `presence_penalty` (OpenAI): minus penalty once seen (0 = off).
3. `temperature` 0 is greedy (argmax); otherwise logits / temperature, then
   `top_k` (0 = off), then `top_p` (1.0 = off), then one draw from what is
   left with a generator seeded by `seed` (None: a fresh random seed), so a
   seeded request gives the same answer every time (given the same logits:
   a quantized program computes them bit for bit the same with one
   ExecuTorch thread on any CPU, with more only on some,
   settings.EXECUTORCH_THREADS).
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runners.base import LOGIT_BIAS_RANGE, SAMPLING_BOUNDS

# Sorting all 49k logits for top_p costs ~40 ms here; the nucleus almost
# always lies within the top few hundred, so look there first (exactly: a
# wider set, then the full sort, whenever these do not reach top_p).
_NUCLEUS_PREFILTERS = (1024, 8192)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_window: int = 64
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    @property
    def penalized(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


# name -> (type, minimum, maximum) for the numeric parameters: a request's,
# plus the runner's own penalty window.
BOUNDS: dict[str, tuple[type, float, float]] = {
    **SAMPLING_BOUNDS,
    "penalty_window": (int, 1, 4096),
}


def check_value(name: str, value: Any) -> str | None:
    """What is wrong with `value` for parameter `name`, or None."""
    if name == "logit_bias":
        return check_logit_bias(value)
    kind, low, high = BOUNDS[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name} must be a number"
    if kind is int and not float(value).is_integer():
        return f"{name} must be a whole number"
    if not low <= value <= high:
        return f"{name} must be between {low:g} and {high:g}"
    if name == "top_p" and value == 0:
        return "top_p must be above 0"
    return None


def check_logit_bias(value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return 'logit_bias must be an object of token id -> bias, e.g. {"2": -100}'
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            return f"logit_bias keys must be token ids, got {key!r}"
        if token < 0:
            return f"logit_bias keys must be token ids, got {key!r}"
        low, high = LOGIT_BIAS_RANGE
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not low <= bias <= high:
            return f"logit_bias values must be numbers from {low:g} to {high:g}, got {bias!r}"
    return None


def logit_bias_ids(value: Mapping | None) -> dict[int, float]:
    return {int(k): float(v) for k, v in (value or {}).items()}


def argmax(logits: Any) -> int:
    """The index of the largest logit (the first one of equals, a NaN before
    any number, as torch's argmax), through NumPy: ~3 µs for 49k values where
    torch's argmax takes ~30, more than 1 % of a decode step (measured).
    A dtype NumPy lacks (bfloat16) goes through torch."""
    try:
        return int(logits.numpy().argmax())
    except TypeError:
        return int(logits.argmax())


class Sampler:
    """Picks tokens for one generation (not thread-safe: one per request)."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        import torch

        self._torch = torch
        self.params = params
        self.vocab_size = vocab_size
        bias = {t: b for t, b in params.logit_bias.items() if 0 <= t < vocab_size}
        self._bias_ids = torch.tensor(list(bias), dtype=torch.long) if bias else None
        self._bias_values = (
            torch.tensor([float(b) for b in bias.values()], dtype=torch.float32) if bias else None
        )
        self._window: deque[int] = deque(maxlen=params.penalty_window)
        self._counts: Counter[int] = Counter()
        self._work: Any = None
        self._scaled: Any = None
        self.generator: Any = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            seed = params.seed
            if seed is None:
                seed = int.from_bytes(os.urandom(8), "little") >> 1
            self.generator.manual_seed(seed)

    def accept(self, token: int) -> None:
        """`token` became part of the answer (it counts for the penalties)."""
        if not self.params.penalized:
            return
        if len(self._window) == self._window.maxlen:
            old = self._window[0]
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
        self._window.append(token)
        self._counts[token] += 1

    def adjust(self, logits: Any) -> Any:
        """The logits after bias and penalties. Never changes `logits`: a
        change is made in the sampler's own buffer (allocated once: a fresh
        196 KB tensor per token costs milliseconds on a busy machine)."""
        torch = self._torch
        logits = logits.reshape(-1)[: self.vocab_size]
        if self._bias_ids is None and not self._counts:
            return logits
        if self._work is None or self._work.shape != logits.shape:
            self._work = torch.empty_like(logits)
        work = self._work
        work.copy_(logits)
        if self._bias_ids is not None:
            work.index_add_(0, self._bias_ids, self._bias_values.to(work.dtype))
        if self._counts:
            p = self.params
            ids = torch.tensor(list(self._counts), dtype=torch.long)
            seen = work.index_select(0, ids)
            if p.repetition_penalty != 1.0:
                seen = torch.where(
                    seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty
                )
            if p.frequency_penalty or p.presence_penalty:
                counts = torch.tensor(list(self._counts.values()), dtype=seen.dtype)
                seen = seen - counts * p.frequency_penalty - p.presence_penalty
            work.index_copy_(0, ids, seen)
        return work

    def pick(self, logits: Any) -> int:
        torch = self._torch
        logits = self.adjust(logits)
        p = self.params
        if p.temperature <= 0:
            return argmax(logits)
        # top_k and the order of the nucleus do not change with temperature:
        # scale only the candidates.
        ids = None
        if 0 < p.top_k < logits.numel():
            scaled, ids = torch.topk(logits, p.top_k)  # sorted, descending
            scaled = scaled.float() / p.temperature
        else:
            if self._scaled is None or self._scaled.shape != logits.shape:
                self._scaled = torch.empty(logits.shape, dtype=torch.float32)
            scaled = torch.div(logits.float(), p.temperature, out=self._scaled)
        if p.top_p < 1.0:
            scaled, ids = self._nucleus(scaled, ids, p.top_p)
        probs = torch.softmax(scaled, dim=-1)
        choice = int(torch.multinomial(probs, 1, generator=self.generator))
        return choice if ids is None else int(ids[choice])

    def _nucleus(self, scaled: Any, ids: Any, top_p: float) -> tuple[Any, Any]:
        torch = self._torch
        total = torch.logsumexp(scaled, dim=-1)
        if ids is None:
            # Widen the candidates until they hold top_p of the mass; a full
            # sort (~40 ms for 49k values) only for a nearly flat distribution.
            found = None
            for width in _NUCLEUS_PREFILTERS:
                if width >= scaled.numel():
                    break
                head, head_ids = torch.topk(scaled, width)
                if float(torch.exp(torch.logsumexp(head, -1) - total)) >= top_p:
                    found = head, head_ids
                    break
            scaled, ids = found or torch.sort(scaled, descending=True)
        probs = torch.exp(scaled - total)
        before = torch.cumsum(probs, -1) - probs
        keep = int((before < top_p).sum().clamp(min=1))
        return scaled[:keep], ids[:keep]
