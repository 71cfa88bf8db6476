"""`prepare_model --gguf PATH`: any Llama-family GGUF becomes an ExecuTorch
program the local runner serves; other architectures and non-GGUF files are
refused with a clear message. The GGUFs are built here, small and with random
weights (the tokenizer copied from the packaged SmolLM2), with the `gguf`
package: no downloads."""

from __future__ import annotations

import asyncio
import functools
from io import StringIO
from pathlib import Path

from django.core.management import CommandError, call_command

import numpy as np
import pytest

from runners.base import ChatMessage, ChatRequest, Done, TokenDelta
from runners.executorch import prepare
from runners.executorch.runner import ExecuTorchRunner, forget_engines
from runners.models import RunnerConfig

DIM, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 128, 256


@functools.cache
def _packaged_tokenizer() -> dict:
    import gguf

    try:
        reader = gguf.GGUFReader(str(prepare.locate_gguf()))
    except prepare.PrepareError as exc:
        pytest.skip(str(exc))
    names = (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.chat_template",
    )
    return {name: reader.fields[name].contents() for name in names}


def write_gguf(path: Path, architecture: str = "llama", seed: int = 0) -> Path:
    """A tiny random-weight model of `architecture` (SmolLM2's tokenizer)."""
    import gguf

    tok = _packaged_tokenizer()
    vocab = len(tok["tokenizer.ggml.tokens"])
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny-{architecture}-test")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(DIM)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tok["tokenizer.ggml.tokens"])
    writer.add_token_types(tok["tokenizer.ggml.token_type"])
    writer.add_token_merges(tok["tokenizer.ggml.merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(tok["tokenizer.chat_template"])
    rng = np.random.default_rng(seed)
    kv = DIM // HEADS * KV_HEADS

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(vocab, DIM))
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(DIM, DIM))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv, DIM))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv, DIM))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(DIM, DIM))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(DIM, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(DIM, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(FFN, DIM))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(DIM, FFN))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(FFN, DIM))
    writer.add_tensor("output_norm.weight", np.ones(DIM, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _command(*args: str) -> str:
    out = StringIO()
    call_command("prepare_model", *args, stdout=out)
    return out.getvalue()


def test_a_file_that_is_not_gguf_is_refused_clearly(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(CommandError, match=r"model\.gguf is not a GGUF file"):
        _command("--gguf", str(fake), "--output-dir", str(tmp_path / "out"))
    with pytest.raises(CommandError, match="does not exist"):
        _command("--gguf", str(tmp_path / "absent.gguf"), "--output-dir", str(tmp_path / "o"))
    assert not (tmp_path / "out" / prepare.PTE_NAME).exists()


def test_an_unsupported_architecture_is_refused_before_any_export(tmp_path):
    path = write_gguf(tmp_path / "tiny-qwen2.gguf", architecture="qwen2")
    with pytest.raises(CommandError) as info:
        _command("--gguf", str(path), "--output-dir", str(tmp_path / "out"))
    message = str(info.value)
    assert "'qwen2'-architecture model" in message
    assert "Llama family" in message
    assert not (tmp_path / "out").exists()


def test_the_packaged_model_keeps_its_export_arguments_and_cache_key():
    info = prepare.inspect_gguf(prepare.locate_gguf())
    assert info["architecture"] == "llama" and info["bos_id"] == 1 and info["eos_id"] == 2
    assert prepare.export_args("8da8w", info) == list(prepare.VARIANTS["8da8w"])


def test_a_variant_our_wrapper_exports_is_keyed_by_the_wrapper_too():
    gguf = prepare.locate_gguf()
    wrapper = Path(prepare.__file__).with_name("export_mixed.py")
    # export_llama's own variants do not change with our wrapper; its variants do.
    assert "exporter_sha256" not in prepare.build_inputs(gguf, "8da8w")
    inputs = prepare.build_inputs(gguf, "8da4w-q41")
    assert inputs["exporter_sha256"] == prepare.buildcache.sha256_file(wrapper)


@pytest.mark.slow
def test_a_llama_gguf_of_another_size_is_prepared_cached_and_served(tmp_path, settings):
    path = write_gguf(tmp_path / "tiny-llama.gguf")
    out = tmp_path / "tiny-model"
    settings.MODEL_CACHE_DIR = str(tmp_path / "cache")
    log = _command("--gguf", str(path), "--output-dir", str(out), "--variant", "fp32")
    assert "tiny-llama-test (llama, context 256)" in log
    manifest = prepare.read_manifest(out)
    assert manifest["model"] == "tiny-llama-test"
    assert manifest["context_tokens"] == CONTEXT
    assert "--max_context_length" in manifest["export_args"]
    # Cached by the file's hash: the second run exports nothing.
    assert "already up to date" in _command(
        "--gguf", str(path), "--output-dir", str(out), "--variant", "fp32"
    )
    # The runner serves it (random weights: any text, but the whole path runs).
    config = RunnerConfig(
        name="tiny",
        kind="executorch",
        temperature=0.0,
        max_tokens=6,
        context_tokens=2048,
        extra_params={
            "pte_path": str(out / "model.pte"),
            "tokenizer_path": str(out / "tokenizer.json"),
        },
    )
    runner = ExecuTorchRunner.from_config(config)
    assert runner.context_tokens == CONTEXT

    async def answer():
        events = [
            e async for e in runner.stream(ChatRequest(messages=(ChatMessage("user", "Hi"),)))
        ]
        return events

    try:
        events = asyncio.run(answer())
    finally:
        forget_engines()
    done = events[-1]
    assert isinstance(done, Done) and done.usage.completion_tokens >= 1
    assert done.finish_reason in {"length", "stop"}
    assert all(isinstance(e, TokenDelta) for e in events[:-1])
