"""Sampling in the local runner's own decode loop (runners/executorch/sampling.py):
each parameter does what docs/executorch.md says, on synthetic logits (exact)
and on the real model (slow)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch

from runners.base import ErrorCode, RunnerError
from runners.executorch.sampling import Sampler, SamplingParams, argmax
from runners.models import RunnerConfig
from tests.runners.test_executorch_runner import ask, collect, make_runner

VOCAB = 10
# Token 3 is the favourite, then 5, then 1; the rest are far behind.
LOGITS = torch.tensor([0.0, 2.0, -1.0, 4.0, 0.5, 3.0, -2.0, 0.0, 1.0, -3.0])

# Each test starts with the local model's slots free (tests.support.fixtures).
pytestmark = pytest.mark.usefixtures("local_model_idle")


def sampler(**params) -> Sampler:
    return Sampler(SamplingParams(**params), VOCAB)


@pytest.mark.parametrize(
    "values",
    [
        [0.0, 3.0, 3.0, 1.0],  # equal maxima: the first
        [1.0, float("nan"), 5.0, float("nan")],  # a NaN wins, the first one
        [-1.0, float("-inf"), -0.5],
        torch.randn(3, 49152)[1].tolist(),  # a row of a real-sized tensor
    ],
)
def test_greedy_argmax_chooses_as_torch_does(values):
    logits = torch.tensor(values, dtype=torch.float32)
    assert argmax(logits) == int(logits.argmax())
    # A view of a program's (1, 1, vocab) output, as the decode loop passes it.
    assert argmax(logits.reshape(1, 1, -1).reshape(-1)[: len(values)]) == int(logits.argmax())
    # A dtype NumPy does not have.
    assert argmax(logits.to(torch.bfloat16)) == int(logits.to(torch.bfloat16).argmax())


def draws(s: Sampler, n: int = 300) -> Counter:
    return Counter(s.pick(LOGITS) for _ in range(n))


# ---- exact, on synthetic logits ----------------------------------------------------


def test_temperature_zero_is_greedy():
    assert {sampler().pick(LOGITS) for _ in range(5)} == {3}


def test_logit_bias_bans_and_forces_tokens():
    assert sampler(logit_bias={3: -100}).pick(LOGITS) == 5
    assert sampler(logit_bias={9: 100}).pick(LOGITS) == 9
    # Added to the logit: 3 (4.0) vs 5 (3.0 + 1.5).
    assert sampler(logit_bias={5: 1.5}).pick(LOGITS) == 5


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    s = sampler(repetition_penalty=2.0)
    s.accept(3)
    s.accept(6)
    adjusted = s.adjust(LOGITS)
    assert adjusted[3] == pytest.approx(2.0)  # 4.0 / 2
    assert adjusted[6] == pytest.approx(-4.0)  # -2.0 * 2
    assert adjusted[5] == pytest.approx(3.0)  # unseen: unchanged
    assert s.pick(LOGITS) == 5  # the repeated favourite lost its lead
    assert LOGITS[3] == 4.0  # the model's logits are never modified


def test_frequency_penalty_grows_with_each_repeat_and_presence_does_not():
    freq = sampler(frequency_penalty=0.5)
    pres = sampler(presence_penalty=0.5)
    for s in (freq, pres):
        for _ in range(3):
            s.accept(3)
    assert freq.adjust(LOGITS)[3] == pytest.approx(4.0 - 3 * 0.5)
    assert pres.adjust(LOGITS)[3] == pytest.approx(4.0 - 0.5)


def test_penalties_only_count_the_last_window_of_tokens():
    s = sampler(presence_penalty=1.0, penalty_window=2)
    s.accept(3)
    assert s.adjust(LOGITS)[3] == pytest.approx(3.0)
    s.accept(4)
    s.accept(4)  # 3 has left the window
    assert s.adjust(LOGITS)[3] == pytest.approx(4.0)
    assert s.adjust(LOGITS)[4] == pytest.approx(-0.5)


def test_top_k_keeps_only_the_k_most_likely_tokens():
    counts = draws(sampler(temperature=2.0, top_k=2, seed=1))
    assert set(counts) == {3, 5}
    # Without top_k, at temperature 2 other tokens are drawn too.
    assert len(draws(sampler(temperature=2.0, seed=1))) > 2


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS, -1)
    # 3 alone has ~0.63, 3 + 5 ~0.86: top_p 0.8 keeps exactly {3, 5}.
    assert probs[3] < 0.8 < probs[3] + probs[5]
    assert set(draws(sampler(temperature=1.0, top_p=0.8, seed=2))) == {3, 5}
    assert set(draws(sampler(temperature=1.0, top_p=0.5, seed=2))) == {3}


def test_top_p_on_a_full_vocabulary_matches_a_plain_sort():
    # The pre-filter on the top 1024 must give the same nucleus as sorting all.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(49152, generator=generator) * 3
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.9), 49152)
    _kept, ids = s._nucleus(logits, None, 0.9)
    values, order = torch.sort(logits, descending=True)
    mass = torch.cumsum(torch.softmax(values, -1), -1)
    kept = len(ids)
    assert torch.equal(ids, order[:kept])  # the likeliest tokens, in order
    # The smallest such set reaching 0.9: without its last token it falls short.
    # (Up to float rounding at the boundary: sums run in another order, and
    # on another number of threads, than a plain sort's.)
    assert mass[kept - 1] >= 0.9 - 1e-5 and mass[kept - 2] < 0.9 + 1e-5
    # A flat distribution: the nucleus is wider than the pre-filter.
    flat = Sampler(SamplingParams(temperature=1.0, top_p=0.99), 49152)
    _, wide = flat._nucleus(torch.zeros(49152), None, 0.99)
    assert len(wide) > 1024


def test_a_seed_repeats_the_same_draws_and_another_seed_does_not():
    first = [sampler(temperature=1.5, seed=42).pick(LOGITS) for _ in range(1)]
    a, b, c = (sampler(temperature=1.5, seed=s) for s in (42, 42, 43))
    seq_a = [a.pick(LOGITS) for _ in range(40)]
    assert seq_a == [b.pick(LOGITS) for _ in range(40)]
    assert seq_a != [c.pick(LOGITS) for _ in range(40)]
    assert seq_a[:1] == first


def test_out_of_range_values_are_the_callers_mistake():
    runner = make_runner()
    for field, value in [
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("repetition_penalty", 3.0),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3),
        ("seed", -1),
        ("logit_bias", {"x": 1}),
        ("logit_bias", {"5": 500}),
    ]:
        with pytest.raises(RunnerError) as info:
            runner.sampling_params(ask("hi", **{field: value}), 0.7)
        assert info.value.code == ErrorCode.INVALID_INPUT
        assert field in info.value.message


def test_runner_defaults_come_from_extra_params_and_requests_override_them():
    runner = make_runner(top_k=5, repetition_penalty=1.3, seed=9)
    params = runner.sampling_params(ask("hi"), 0.7)
    assert (params.top_k, params.repetition_penalty, params.seed, params.top_p) == (
        5,
        1.3,
        9,
        0.9,
    )
    params = runner.sampling_params(ask("hi", top_k=0, repetition_penalty=1.0), 0.2)
    assert (params.top_k, params.repetition_penalty, params.temperature) == (0, 1.0, 0.2)


def test_the_admin_refuses_bad_sampling_defaults():
    config = RunnerConfig(name="x", kind="executorch", extra_params={"top_p": 2})
    from runners.executorch.runner import ExecuTorchRunner

    assert (
        "top_p must be between 0 and 1" in ExecuTorchRunner.validate_config(config)["extra_params"]
    )
    config.extra_params = {"top_k": 40, "logit_bias": {"2": -100}}
    assert ExecuTorchRunner.validate_config(config) == {}


# ---- the real model -----------------------------------------------------------------


def _answer(runner, question: str, **kwargs) -> str:
    text, _, _done = asyncio.run(collect(runner, ask(question, **kwargs)))
    return text


@pytest.mark.slow
def test_seeded_runs_are_reproducible_on_the_model(model_ready):
    runner = make_runner()
    kwargs = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_tokens": 24}
    a = _answer(runner, "Tell me about cats.", seed=7, **kwargs)
    b = _answer(runner, "Tell me about cats.", seed=7, **kwargs)
    others = {_answer(runner, "Tell me about cats.", seed=s, **kwargs) for s in (8, 9, 10)}
    assert a == b
    assert others - {a}  # another seed, another answer


@pytest.mark.slow
def test_greedy_decoding_matches_executorchs_own_runner(model_ready):
    """Our loop with every adjustment off gives TextLLMRunner's greedy answer."""
    from django.conf import settings

    # The kernels the program calls (our runner loads them in its engine process).
    import executorch.extension.llm.custom_ops.custom_ops
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    runner = make_runner(repetition_penalty=1.0)
    question = "What is the largest planet in the solar system?"
    ours = _answer(runner, question, max_tokens=32)
    engine = runner._engine
    prompt = engine.render(ask(question).messages)
    native = TextLLMRunner(
        str(settings.MODELS_DIR / "model.pte"), str(settings.MODELS_DIR / "tokenizer.json")
    )
    pieces: list[str] = []
    native.generate(
        prompt,
        GenerationConfig(echo=False, max_new_tokens=32, temperature=0.0, warming=True),
        pieces.append,
        lambda stats: None,
    )
    theirs = "".join(pieces).replace("<|im_end|>", "")
    assert ours.strip() and ours == theirs


@pytest.mark.slow
def test_penalties_change_the_answer_as_documented(model_ready):
    """Counting to 30 greedily repeats the same digit tokens; the repetition
    and frequency penalties push the most repeated token down."""
    runner = make_runner()
    question = "Count from 1 to 30, separated by commas."

    def most_repeated(**kwargs) -> tuple[str, int]:
        text = _answer(runner, question, max_tokens=60, **kwargs)
        return text, Counter(runner._engine.encode(text)).most_common(1)[0][1]

    plain, plain_top = most_repeated(repetition_penalty=1.0)
    for kwargs in ({"repetition_penalty": 1.3}, {"frequency_penalty": 1.0}):
        text, top = most_repeated(
            repetition_penalty=kwargs.pop("repetition_penalty", 1.0), **kwargs
        )
        assert text != plain
        assert top < plain_top


@pytest.mark.slow
def test_logit_bias_bans_a_word_on_the_model(model_ready):
    runner = make_runner()
    engine_text = _answer(runner, "What is the capital of France?")
    assert "Paris" in engine_text
    (paris,) = runner._engine.encode(" Paris")
    banned = _answer(runner, "What is the capital of France?", logit_bias={str(paris): -100})
    assert " Paris" not in banned
