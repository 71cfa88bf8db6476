"""Benchmark: the local ExecuTorch runner vs the bare TextLLMRunner vs PyTorch eager.

    .venv/bin/python bench/executorch_runner.py [--variants 8da8w,8da4w-q41,8da4w,fp32] [--runs 3]
    .venv/bin/python bench/executorch_runner.py --runs 6 \
        --only overhead|pyloop|sampling|multiturn|busy|parallel

In one run, on the same prompts, each in its own subprocess (so peak RSS is
its own): (a) our `ExecuTorchRunner.stream`, (b) the bare
`TextLLMRunner.generate` on the same program, (c) HF transformers eager on the
GGUF's de-quantized fp32 weights, (d) llama.cpp on the GGUF itself when
`llama-cpp-python` is installed (for the benchmark only, not a requirement:
`CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install --no-cache-dir
llama-cpp-python==0.3.36`, a source build of a few minutes). Reports
prefill and decode tokens/s, time to first token, peak RSS, the ratios
(runner vs eager, runner overhead vs bare), the greedy answers of a small
fixed question set, and each variant's export time (from its manifest).
Variants other than the prepared default are built into the model cache on
first use (about 4-16 minutes each on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "breezeweb.settings")

# The fixed answer-agreement set (issue 17: facts, arithmetic, short
# instructions) and the speed prompt: the ones `manage.py evaluate_model`
# measures for the runner admin. Each variant's greedy answers are compared
# with fp32's.
from runners.executorch.evaluate import (  # noqa: E402
    ANSWER_TOKENS,
    QUESTIONS,
    SPEED_PROMPT,
    SPEED_TOKENS,
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _summary(samples: list[dict]) -> dict:
    keys = ("prompt_tokens", "generated", "ttft_ms", "prefill_tps", "decode_tps")
    return {k: round(statistics.median(s[k] for s in samples), 2) for k in keys}


def _render(template_path: Path, question: str) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(template_path.read_text())
    return template.render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True
    )


# ---- workers (each runs in its own process) ------------------------------------------


def runner_session(model_dir: Path, **extra):
    """(runner, async one(question, max_tokens) -> (text, sample)) through our
    runner; `extra` adds extra_params (sampling, reuse_kv_cache). Greedy with
    every sampling adjustment off unless `extra` says otherwise, like the bare
    runner."""
    import django

    django.setup()
    from runners.base import ChatMessage, ChatRequest, Done, TokenDelta
    from runners.executorch.runner import ExecuTorchRunner
    from runners.models import RunnerConfig

    config = RunnerConfig(
        name="bench",
        kind="executorch",
        temperature=0.0,
        max_tokens=ANSWER_TOKENS,
        extra_params={
            "pte_path": str(model_dir / "model.pte"),
            "tokenizer_path": str(model_dir / "tokenizer.json"),
            "repetition_penalty": 1.0,
            # A repeated prompt would be served from the KV cache: not what
            # the bare runner does.
            "reuse_kv_cache": False,
            **extra,
        },
    )
    runner = ExecuTorchRunner.from_config(config)

    async def one(question, max_tokens: int, **kwargs) -> tuple[str, dict]:
        messages = (
            (ChatMessage("user", question),) if isinstance(question, str) else tuple(question)
        )
        request = ChatRequest(messages=messages, max_tokens=max_tokens, **kwargs)
        started = time.perf_counter()
        first = last = None
        text = ""
        done = None
        async for event in runner.stream(request):
            now = time.perf_counter()
            if isinstance(event, TokenDelta):
                first = first or now
                last = now
                text += event.text
            elif isinstance(event, Done):
                done = event
        assert done is not None and first is not None and last is not None
        n = done.usage.completion_tokens
        return text, {
            "prompt_tokens": done.usage.prompt_tokens,
            "generated": n,
            "ttft_ms": (first - started) * 1000,
            "prefill_tps": done.timings.prefill_tokens_per_second or 0.0,
            # Decode measured where the caller sees tokens: first to last delta.
            "decode_tps": (n - 1) / (last - first) if n > 1 and last > first else 0.0,
        }

    return runner, one


def bare_session(model_dir: Path):
    """(load seconds, one(question, max_tokens) -> (text, sample)) on TextLLMRunner."""
    import tempfile

    import django

    import executorch.extension.llm.custom_ops.custom_ops
    import executorch.kernels.quantized  # noqa: F401 (registers kernels)
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    django.setup()
    from runners.executorch.runner import PieceDecoder

    # TextLLMRunner hands each piece to Python as str and raises
    # UnicodeDecodeError on a token that ends inside a UTF-8 character (é,
    # emoji): give it the tokenizer without its decoder (byte-level pieces,
    # always valid) and decode them as the runner does.
    data = json.loads((model_dir / "tokenizer.json").read_text())
    data["decoder"] = None
    raw_tokenizer = Path(tempfile.mkdtemp()) / "tokenizer.json"
    raw_tokenizer.write_text(json.dumps(data))
    started = time.perf_counter()
    native = TextLLMRunner(str(model_dir / "model.pte"), str(raw_tokenizer))
    load_s = time.perf_counter() - started
    template = model_dir / "chat_template.jinja"

    def one(question: str, max_tokens: int) -> tuple[str, dict]:
        pieces: list[str] = []
        times: list[float] = []
        stats: dict = {}

        decoder = PieceDecoder()

        def on_token(piece: str) -> None:
            times.append(time.perf_counter())
            pieces.append(decoder.feed(piece))

        def on_stats(s) -> None:
            stats.update(
                prompt=s.num_prompt_tokens,
                start=s.inference_start_ms,
                prompt_end=s.prompt_eval_end_ms,
            )

        # The same configuration the runner uses (warming: no stdout echo).
        config = GenerationConfig(
            echo=False, max_new_tokens=max_tokens, temperature=0.0, warming=True
        )
        started = time.perf_counter()
        native.generate(_render(template, question), config, on_token, on_stats)
        native.reset()
        prompt_ms = stats["prompt_end"] - stats["start"]
        return "".join(pieces).replace("<|im_end|>", ""), {
            "prompt_tokens": stats["prompt"],
            "generated": len(times),
            "ttft_ms": (times[0] - started) * 1000,
            "prefill_tps": stats["prompt"] / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
            "decode_tps": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
        }

    return load_s, one


def answers_and_speed(one, runs: int, load_s: float, **extra) -> dict:
    """What every path reports, `one(question, max_tokens) -> (text, sample)`
    after a warm-up: the greedy answers to QUESTIONS, the median figures of
    `runs` speed prompts, its load time and this process' peak RSS."""
    one("Hi", 4)
    answers = [one(q, ANSWER_TOKENS)[0].strip() for q in QUESTIONS]
    samples = [one(SPEED_PROMPT, SPEED_TOKENS)[1] for _ in range(runs)]
    return {
        "load_s": round(load_s, 2),
        "answers": answers,
        "speed": _summary(samples),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        **extra,
    }


def versus_bare(runs: int, runner_speed, bare_speed, **figures) -> dict:
    """Our runner vs the bare runner in one process, alternating which goes
    first on the speed prompt, so a busy machine slows both alike: medians of
    the per-round figures. `runner_speed()` / `bare_speed()` give one round's
    sample; each `figures` entry, name=(f(runner_sample, bare_sample), digits),
    adds the median of f rounded to digits."""
    rounds = []
    for i in range(runs):
        if i % 2:
            b = bare_speed()
            r = runner_speed()
        else:
            r = runner_speed()
            b = bare_speed()
        rounds.append((r, b))

    def median(f) -> float:
        return statistics.median(f(r, b) for r, b in rounds)

    return {
        "rounds": len(rounds),
        "decode_ratio": round(median(lambda r, b: r["decode_tps"] / b["decode_tps"]), 3),
        **{name: round(median(f), digits) for name, (f, digits) in figures.items()},
        "runner_decode_tps": round(median(lambda r, _: r["decode_tps"]), 1),
        "bare_decode_tps": round(median(lambda _, b: b["decode_tps"]), 1),
    }


def worker_runner(model_dir: Path, runs: int) -> dict:
    runner, one = runner_session(model_dir)
    with asyncio.Runner() as loop:
        started = time.perf_counter()
        loop.run(runner.load())
        load_s = time.perf_counter() - started
        return answers_and_speed(lambda q, n: loop.run(one(q, n)), runs, load_s)


def worker_bare(model_dir: Path, runs: int) -> dict:
    load_s, one = bare_session(model_dir)
    return answers_and_speed(one, runs, load_s)


def worker_overhead(model_dir: Path, runs: int) -> dict:
    """Runner vs bare on the same greedy decode: what our runner costs."""
    runner, runner_one = runner_session(model_dir)
    _, bare_one = bare_session(model_dir)
    with asyncio.Runner() as loop:
        loop.run(runner.load())
        loop.run(runner_one("Hi", 4))
        bare_one("Hi", 4)
        return versus_bare(
            runs,
            lambda: loop.run(runner_one(SPEED_PROMPT, SPEED_TOKENS))[1],
            lambda: bare_one(SPEED_PROMPT, SPEED_TOKENS)[1],
            ttft_delta_ms=(lambda r, b: r["ttft_ms"] - b["ttft_ms"], 1),
        )


def worker_busy(model_dir: Path, runs: int) -> dict:
    """The local runner beside other work of its web process's event loop
    (what serving other users is to it), rounds alternating in one process:
    the loop's work alone, the decode alone, then both at once. Reports the
    decode's speed and the loop's work (pure-Python slices of ~1 ms per
    second) when together, each as a ratio of its speed alone."""
    runner, runner_one = runner_session(model_dir)
    together: list[tuple[float, float]] = []
    alone_decode: list[float] = []
    alone_loop: list[float] = []

    async def busy(done: list[int], stop: asyncio.Event) -> None:
        # Pure-Python slices of ~1 ms, yielding to the loop between them.
        while not stop.is_set():
            total = 0
            for i in range(20_000):
                total += i * i
            done[0] += 1
            await asyncio.sleep(0)

    async def loop_alone(seconds: float) -> float:
        done, stop = [0], asyncio.Event()
        task = asyncio.ensure_future(busy(done, stop))
        await asyncio.sleep(seconds)
        stop.set()
        await task
        return done[0] / seconds

    async def both() -> tuple[float, float]:
        done, stop = [0], asyncio.Event()
        task = asyncio.ensure_future(busy(done, stop))
        started = time.perf_counter()
        _, sample = await runner_one(SPEED_PROMPT, SPEED_TOKENS)
        elapsed = time.perf_counter() - started
        stop.set()
        await task
        return sample["decode_tps"], done[0] / elapsed

    with asyncio.Runner() as loop:
        loop.run(runner.load())
        loop.run(runner_one("Hi", 4))
        for _ in range(runs):
            alone_loop.append(loop.run(loop_alone(1.0)))
            alone_decode.append(loop.run(runner_one(SPEED_PROMPT, SPEED_TOKENS))[1]["decode_tps"])
            together.append(loop.run(both()))

    decode_alone = statistics.median(alone_decode)
    slices_alone = statistics.median(alone_loop)
    decode_both = statistics.median(r[0] for r in together)
    slices_both = statistics.median(r[1] for r in together)
    return {
        "rounds": runs,
        "alone": {"decode_tps": round(decode_alone, 1), "loop_slices_per_s": round(slices_alone)},
        "together": {"decode_tps": round(decode_both, 1), "loop_slices_per_s": round(slices_both)},
        "decode_ratio": round(decode_both / decode_alone, 2),
        "loop_ratio": round(slices_both / slices_alone, 2),
    }


def worker_parallel(model_dir: Path, runs: int) -> dict:
    """Two answers at once through a runner with `parallelism: 2` (two
    slots), against one answer alone through the same runner, rounds
    alternating, medians: aggregate decode tokens/s and their ratio (2.0
    would be two slots serving two users each at full speed; 1.0, taking
    turns). Greedy, SPEED_TOKENS new tokens each. Uses only the runner's
    public API, so the same worker measures any commit of it."""
    runner, one = runner_session(model_dir, parallelism=2)

    async def at_once(count: int) -> float:
        started = time.perf_counter()
        answers = await asyncio.gather(*(one(SPEED_PROMPT, SPEED_TOKENS) for _ in range(count)))
        return sum(sample["generated"] for _, sample in answers) / (time.perf_counter() - started)

    alone: list[float] = []
    two: list[float] = []
    with asyncio.Runner() as loop:
        loop.run(runner.load())
        loop.run(at_once(2))  # warm-up: both slots
        for _ in range(runs):
            alone.append(loop.run(at_once(1)))
            two.append(loop.run(at_once(2)))
    return {
        "rounds": runs,
        "one_answer_tps": round(statistics.median(alone), 1),
        "two_at_once_tps": round(statistics.median(two), 1),
        "ratio": round(statistics.median(t / a for t, a in zip(two, alone, strict=True)), 2),
    }


def worker_pyloop(model_dir: Path, runs: int) -> dict:
    """The runner's decode loop alone, greedy (the program's `forward` per
    token and argmax, in this thread, no event loop) vs the bare runner,
    interleaved: what the Python loop itself costs, apart from handing tokens
    to asyncio."""
    import torch

    from runners.executorch.engine_process import _load_program
    from runners.executorch.sampling import argmax

    _, bare_one = bare_session(model_dir)
    from django.conf import settings

    pte = str(model_dir / "model.pte")
    method = _load_program(pte, settings.EXECUTORCH_THREADS).load_method("forward")
    prompt = list(range(100, 100 + 40))
    torch.set_num_threads(1)  # as the runner's generation thread does

    def loop_speed() -> dict:
        logits = method.execute([torch.tensor([prompt]), torch.tensor([0])])[0]
        token_in = torch.zeros((1, 1), dtype=torch.long)
        position_in = torch.zeros((1,), dtype=torch.long)
        started = time.perf_counter()
        for position in range(len(prompt), len(prompt) + SPEED_TOKENS):
            token_in[0, 0] = argmax(logits)
            position_in[0] = position
            logits = method.execute([token_in, position_in])[0]
        return {"decode_tps": SPEED_TOKENS / (time.perf_counter() - started)}

    loop_speed()
    bare_one("Hi", 4)
    return versus_bare(runs, loop_speed, lambda: bare_one(SPEED_PROMPT, SPEED_TOKENS)[1])


def worker_sampling(model_dir: Path, runs: int) -> dict:
    """The per-token cost of full sampling (temperature 0.7, top_k 40, top_p
    0.9, repetition penalty 1.1: the local runner's defaults) vs the bare
    TextLLMRunner's greedy decode, interleaved in one process."""
    runner, runner_one = runner_session(
        model_dir, repetition_penalty=1.1, top_k=40, top_p=0.9, seed=1
    )
    _, bare_one = bare_session(model_dir)
    with asyncio.Runner() as loop:
        loop.run(runner.load())
        loop.run(runner_one("Hi", 4))
        return versus_bare(
            runs,
            lambda: loop.run(runner_one(SPEED_PROMPT, SPEED_TOKENS, temperature=0.7))[1],
            lambda: bare_one(SPEED_PROMPT, SPEED_TOKENS)[1],
            # Per-token time difference: what sampling adds to each token.
            per_token_overhead_ms=(
                lambda r, b: 1000 / r["decode_tps"] - 1000 / b["decode_tps"],
                3,
            ),
        )


MULTITURN_SYSTEM = (
    "You are a helpful assistant for the staff of a small public library. Answer briefly, "
    "politely and accurately, and say when you do not know."
)
MULTITURN_QUESTIONS = (
    "What is a library card?",
    "How long can I borrow a book for?",
    "What happens if I return a book late?",
    "Can I renew a book online?",
    "What is an e-book?",
    "How do I find a book on a shelf?",
    "What is the Dewey Decimal System?",
    "Can children have their own library card?",
    "What is interlibrary loan?",
    "Can you summarise what we talked about?",
)


def worker_multiturn(model_dir: Path, runs: int) -> dict:
    """TTFT of the 10th turn of a conversation, with the KV cache of the
    previous turns reused vs a full prefill, alternating in one process."""
    from runners.base import ChatMessage

    reuse, reuse_one = runner_session(model_dir, reuse_kv_cache=True)
    _, fresh_one = runner_session(model_dir, reuse_kv_cache=False)

    async def main() -> dict:
        await reuse.load()
        # The conversation: nine answered turns (greedy, so always the same).
        history = [ChatMessage("system", MULTITURN_SYSTEM)]
        for question in MULTITURN_QUESTIONS[:-1]:
            history.append(ChatMessage("user", question))
            text, _ = await reuse_one(history, 64)
            history.append(ChatMessage("assistant", text))
        ninth = history[:-1]
        tenth = [*history, ChatMessage("user", MULTITURN_QUESTIONS[-1])]
        rounds = []
        for i in range(runs):
            order = ("reuse", "fresh") if i % 2 == 0 else ("fresh", "reuse")
            sample = {}
            for mode in order:
                if mode == "reuse":
                    await reuse_one(ninth, 64)  # the 9th turn, as the user saw it
                    text, sample["reuse"] = await reuse_one(tenth, 16)
                    sample["reused"] = reuse._engine.last_reused_tokens
                else:
                    text, sample["fresh"] = await fresh_one(tenth, 16)
            rounds.append(sample)
        return {
            "rounds": len(rounds),
            "prompt_tokens": rounds[0]["fresh"]["prompt_tokens"],
            "reused_tokens": rounds[0]["reused"],
            "ttft_reuse_ms": round(statistics.median(r["reuse"]["ttft_ms"] for r in rounds), 1),
            "ttft_fresh_ms": round(statistics.median(r["fresh"]["ttft_ms"] for r in rounds), 1),
            "speedup": round(
                statistics.median(r["fresh"]["ttft_ms"] / r["reuse"]["ttft_ms"] for r in rounds),
                2,
            ),
        }

    return asyncio.run(main())


def worker_llamacpp(model_dir: Path, runs: int, threads: int = 2) -> dict:
    """llama.cpp (llama-cpp-python, installed for the benchmark only) on the
    packaged Q4_1 GGUF, greedy, the same rendered prompts."""
    from llama_cpp import Llama, llama_print_system_info

    from runners.executorch.prepare import locate_gguf

    gguf = locate_gguf()
    started = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - started
    template = model_dir / "chat_template.jinja"  # the same prompt as the runner's

    def one(question: str, max_tokens: int) -> tuple[str, dict]:
        prompt = _render(template, question)
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        llm.reset()
        times: list[float] = []
        pieces: list[bytes] = []
        started = time.perf_counter()
        for token in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            if token == llm.token_eos() or len(times) > max_tokens:
                break
            pieces.append(llm.detokenize([token]))
        text = b"".join(pieces).decode(errors="replace").replace("<|im_end|>", "")
        n = len(times)
        return text, {
            "prompt_tokens": len(tokens),
            "generated": n,
            "ttft_ms": (times[0] - started) * 1000,
            "prefill_tps": len(tokens) / (times[0] - started),
            "decode_tps": (n - 1) / (times[-1] - times[0]) if n > 1 else 0.0,
        }

    return answers_and_speed(
        one,
        runs,
        load_s,
        system_info=llama_print_system_info().decode(errors="replace").strip(),
    )


def worker_eager(model_dir: Path | None, runs: int) -> dict:
    """HF transformers eager on the GGUF's de-quantized fp32 weights
    (`model_dir` unused: the weights come from the GGUF)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from runners.executorch.prepare import locate_gguf

    gguf = locate_gguf()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    model.eval()
    load_s = time.perf_counter() - started

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def one(question: str, max_tokens: int) -> tuple[str, dict]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        clock = Clock()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                streamer=clock,
                pad_token_id=tokenizer.eos_token_id,
            )
        new = out[0, ids.shape[1] :]
        token_times = clock.times[1:]  # the first put is the prompt
        n = len(new)
        ttft = token_times[0] - started
        return tokenizer.decode(new, skip_special_tokens=True), {
            "prompt_tokens": ids.shape[1],
            "generated": n,
            "ttft_ms": ttft * 1000,
            "prefill_tps": ids.shape[1] / ttft,
            "decode_tps": (n - 1) / (token_times[-1] - token_times[0]) if n > 1 else 0.0,
        }

    return answers_and_speed(one, runs, load_s, torch_threads=torch.get_num_threads())


# Each runs in a process of its own (`--worker NAME`), called with (model_dir, runs).
# Where the `follow` workers read fp32's answer tokens from (a JSON list per question).
REFERENCE_ENV = "BENCH_REFERENCE_PATHS"


def _reference_paths() -> list[list[int]] | None:
    path = os.environ.get(REFERENCE_ENV)
    return json.loads(Path(path).read_text()) if path else None


def worker_follow(model_dir: Path, runs: int) -> dict:
    """Without a reference: this program's own answer tokens (its top-1 at
    each step). With one: at how many steps of the reference's answers its
    top-1 is the reference's next token (teacher forcing; evaluate.follow)."""
    import django

    django.setup()
    from runners.executorch import evaluate

    reference = _reference_paths()
    runner = evaluate.measuring_runner(model_dir)

    async def main() -> dict:
        await runner.load()
        try:
            if reference is None:
                paths = []
                for question in QUESTIONS:
                    message = (evaluate.ChatMessage("user", question),)
                    paths.append(await runner.greedy_steps(message, max_new=ANSWER_TOKENS))
                return {"paths": paths}
            same, steps = await evaluate.follow(runner, QUESTIONS, reference)
            return {"same": same, "steps": steps}
        finally:
            await runner.close()

    return asyncio.run(main())


def worker_llamacpp_follow(model_dir: Path, runs: int) -> dict:
    """llama.cpp's top-1 along the reference's answers (as worker_follow)."""
    import numpy as np
    from llama_cpp import Llama

    from runners.executorch.prepare import locate_gguf

    reference = _reference_paths()
    llm = Llama(model_path=str(locate_gguf()), n_ctx=2048, n_threads=2, verbose=False)
    same = steps = 0
    for question, path in zip(QUESTIONS, reference or [], strict=True):
        prompt = _render(model_dir / "chat_template.jinja", question)
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=True))
        for token in path:
            # Without logits_all, llama-cpp-python keeps no scores: read the
            # context's logits of the last token evaluated.
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            same += int(np.argmax(logits)) == token
            steps += 1
            llm.eval([token])
    return {"same": same, "steps": steps}


WORKERS = {
    "follow": worker_follow,
    "llamacpp-follow": worker_llamacpp_follow,
    "runner": worker_runner,
    "bare": worker_bare,
    "eager": worker_eager,
    "overhead": worker_overhead,
    "pyloop": worker_pyloop,
    "busy": worker_busy,
    "parallel": worker_parallel,
    "sampling": worker_sampling,
    "multiturn": worker_multiturn,
    "llamacpp": worker_llamacpp,
}


# ---- driver ------------------------------------------------------------------------


def _variant_dir(variant: str) -> Path:
    """The prepared directory for `variant`: MODELS_DIR for the default, the
    model cache for others (built there on first use)."""
    import django

    django.setup()
    from django.conf import settings

    from runners.executorch import prepare

    models_dir = Path(settings.MODELS_DIR)
    if variant != prepare.DEFAULT_VARIANT:
        models_dir = prepare.variant_dir(Path(settings.MODEL_CACHE_DIR), variant)
    result = prepare.prepare_model(models_dir, Path(settings.MODEL_CACHE_DIR), variant)
    return result.directory


def _spawn(kind: str, runs: int, model_dir: Path | None = None) -> dict:
    argv = [sys.executable, __file__, "--worker", kind, "--runs", str(runs)]
    if model_dir is not None:
        argv += ["--model-dir", str(model_dir)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"{kind} worker failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _follow_fp32(results: dict) -> None:
    """results["follow"]: each variant's (and llama.cpp's) next-token agreement
    along fp32's own answer tokens."""
    import tempfile

    directories = {variant: _variant_dir(variant) for variant in results["variants"]}
    own = _spawn("follow", 1, directories["fp32"])["paths"]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as out:
        json.dump(own, out)
    os.environ[REFERENCE_ENV] = out.name
    try:
        followed = {v: _spawn("follow", 1, d) for v, d in directories.items()}
        if results.get("llamacpp"):
            default = _variant_dir("8da8w")
            followed["llama.cpp Q4_1"] = _spawn("llamacpp-follow", 1, default)
    finally:
        del os.environ[REFERENCE_ENV]
        os.unlink(out.name)
    results["follow"] = followed


def _row(label: str, r: dict) -> str:
    s = r["speed"]
    return (
        f"| {label} | {s['prefill_tps']:.0f} | {s['decode_tps']:.1f} | {s['ttft_ms']:.0f} | "
        f"{r['peak_rss_mb']:.0f} | {r['load_s']:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="8da8w,8da4w-q41,8da4w,fp32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--worker", choices=list(WORKERS))
    parser.add_argument(
        "--no-eager", action="store_true", help="skip PyTorch eager (slow: ~25 tok/s)"
    )
    parser.add_argument(
        "--speed-and-answers-only",
        action="store_true",
        help="per variant only the runner and the bare runner (no overhead, sampling or "
        "multi-turn measurements)",
    )
    parser.add_argument(
        "--only",
        choices=["overhead", "pyloop", "sampling", "multiturn", "busy", "parallel"],
        help="run just this measurement on the prepared default model and print it",
    )
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.model_dir, args.runs)))
        return
    if args.only:
        print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
        print(json.dumps(_spawn(args.only, args.runs, _variant_dir("8da8w"))))
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return

    from runners.executorch import prepare

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    results: dict = {"variants": {}}
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    print(f"speed prompt: {SPEED_TOKENS} new tokens, median of {args.runs} runs, greedy")
    eager = None if args.no_eager else _spawn("eager", args.runs)
    results["eager"] = eager
    try:
        llamacpp = _spawn("llamacpp", args.runs, _variant_dir(prepare.DEFAULT_VARIANT))
    except SystemExit as exc:  # llama-cpp-python is for the benchmark only
        print(f"llama.cpp skipped: {exc}")
        llamacpp = None
    results["llamacpp"] = llamacpp
    for variant in variants:
        model_dir = _variant_dir(variant)
        manifest = prepare.read_manifest(model_dir) or {}
        runner = _spawn("runner", args.runs, model_dir)
        bare = _spawn("bare", args.runs, model_dir)
        overhead = sampling = multiturn = None
        if not args.speed_and_answers_only:
            overhead = _spawn("overhead", args.runs * 2, model_dir)
            sampling = _spawn("sampling", args.runs * 2, model_dir)
            multiturn = _spawn("multiturn", args.runs, model_dir)
        results["variants"][variant] = {
            "overhead": overhead,
            "sampling": sampling,
            "multiturn": multiturn,
            "export_seconds": manifest.get("export_seconds"),
            "pte_mb": round((model_dir / prepare.PTE_NAME).stat().st_size / 1e6, 1),
            "runner": runner,
            "bare": bare,
        }
    results["load_average_after"] = round(os.getloadavg()[0], 2)

    print()
    print("| path | prefill tok/s | decode tok/s | TTFT ms | peak RSS MB | load s |")
    print("|---|---|---|---|---|---|")
    if eager:
        print(_row("HF transformers eager (fp32 from GGUF)", eager))
    if llamacpp:
        print(_row("llama.cpp (llama-cpp-python, Q4_1 GGUF, 2 threads)", llamacpp))
    for variant, r in results["variants"].items():
        print(_row(f"{variant}: ExecuTorchRunner.stream", r["runner"]))
        print(_row(f"{variant}: bare TextLLMRunner.generate", r["bare"]))
    print()
    for variant, r in results["variants"].items():
        rs, bs = r["runner"]["speed"], r["bare"]["speed"]
        versus = []
        if eager:
            e = eager["speed"]
            versus.append(
                f"decode {rs['decode_tps'] / e['decode_tps']:.1f}x eager (bare "
                f"{bs['decode_tps'] / e['decode_tps']:.1f}x)"
            )
        if llamacpp:
            lc = llamacpp["speed"]
            versus.append(
                f"decode {rs['decode_tps'] / lc['decode_tps']:.2f}x llama.cpp (bare "
                f"{bs['decode_tps'] / lc['decode_tps']:.2f}x), TTFT "
                f"{rs['ttft_ms']:.0f} vs {lc['ttft_ms']:.0f} ms"
            )
        print(
            f"{variant}: {'; '.join(versus)}; export {r['export_seconds']} s, .pte {r['pte_mb']} MB"
        )
        if r["overhead"] is None:
            continue
        o = r["overhead"]
        print(
            f"{variant}: runner vs bare, interleaved in one process ({o['rounds']} rounds): "
            f"decode ratio {o['decode_ratio']:.3f} ({o['runner_decode_tps']} vs "
            f"{o['bare_decode_tps']} tok/s), TTFT {o['ttft_delta_ms']:+.1f} ms"
        )
        sm = r["sampling"]
        print(
            f"{variant}: default sampling vs bare greedy, interleaved ({sm['rounds']} rounds): "
            f"decode ratio {sm['decode_ratio']:.3f}, +{sm['per_token_overhead_ms']} ms/token"
        )
        m = r["multiturn"]
        print(
            f"{variant}: 10th turn ({m['prompt_tokens']} prompt tokens, {m['reused_tokens']} "
            f"reused): TTFT {m['ttft_reuse_ms']} ms with KV reuse vs {m['ttft_fresh_ms']} ms "
            f"full prefill ({m['speedup']}x)"
        )
    reference = results["variants"].get("fp32")
    if reference:
        _follow_fp32(results)
        print()
        print(
            "The same next token as fp32 along fp32's answers (teacher forcing: each step "
            "fed fp32's answer so far):"
        )
        for name, followed in results["follow"].items():
            share = 100 * followed["same"] / followed["steps"]
            print(f"- {name}: {followed['same']}/{followed['steps']} steps ({share:.1f} %)")
        print()
        print(f"Greedy answers identical to fp32's ({len(QUESTIONS)} questions):")
        for variant, r in results["variants"].items():
            same = sum(
                a == b
                for a, b in zip(r["runner"]["answers"], reference["runner"]["answers"], strict=True)
            )
            print(f"- {variant}: {same}/{len(QUESTIONS)}")
        if llamacpp:
            same = sum(
                a == b
                for a, b in zip(llamacpp["answers"], reference["runner"]["answers"], strict=True)
            )
            print(f"- llama.cpp Q4_1: {same}/{len(QUESTIONS)}")
    print()
    print("Greedy answers:")
    for i, question in enumerate(QUESTIONS):
        print(f"- {question}")
        if eager:
            print(f"    eager: {eager['answers'][i]!r}")
        if llamacpp:
            print(f"    llama.cpp: {llamacpp['answers'][i]!r}")
        for variant, r in results["variants"].items():
            print(f"    {variant} runner: {r['runner']['answers'][i]!r}")
            if r["bare"]["answers"][i] != r["runner"]["answers"][i]:
                print(f"    {variant} bare:   {r['bare']['answers'][i]!r}")
    print(f"\nload average after: {results['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
