"""Export the packaged all-MiniLM-L6-v2 to ONNX once, int8-quantized, cached by
the hash of its inputs (core.buildcache, the scheme the chat model's build
uses too).

`prepare_embeddings(models_dir, cache_dir)` writes, in `models_dir/embeddings`:

- `model.int8.onnx`: the BERT encoder with mean pooling and L2 normalisation
  inside the graph (inputs `input_ids`, `attention_mask`; output `embedding`),
  weights dynamically quantized to int8 by ONNX Runtime;
- `tokenizer.json`: the model's own tokenizer (read with `tokenizers`);
- `manifest.json`: the hashes of every input (model weights, config, tokenizer,
  exporter version, torch/onnx/onnxruntime versions) and the check against
  sentence-transformers (minimum cosine on a fixed set of sentences). Written
  last: its presence means the directory is complete.

The build is kept in `cache_dir/embeddings/<key>` and linked into
`models_dir`, so a second run (or a fresh clone on the same machine) takes a
fraction of a second. Nothing here touches Django.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core import buildcache

ONNX_NAME = "model.int8.onnx"
TOKENIZER_NAME = "tokenizer.json"
OUTPUT_FILES = (ONNX_NAME, TOKENIZER_NAME)
SUBDIR = "embeddings"

# Bumped whenever the export below changes what it writes.
EXPORTER_VERSION = 1
OPSET = 17
# Vectors of the exported model vs sentence-transformers on CHECK_SENTENCES:
# below this cosine the export is refused (int8 measures ~0.99 here).
MIN_COSINE = 0.97

CHECK_SENTENCES = (
    "The lighthouse keeper lit the lamp at dusk.",
    "socket.settimeout(value) sets a timeout on blocking socket operations.",
    "How do I prune apple trees in late winter?",
    "RFC 9110 defines the semantics of HTTP, including methods and status codes.",
    "Changed in version 3.11: the default was changed from None to 30 seconds.",
    "a",
)

Progress = Callable[[str], None]


class ExportError(Exception):
    """The export failed for a reason the user can act on."""


@dataclass(frozen=True)
class PreparedEmbeddings:
    directory: Path
    manifest: dict
    action: str  # up-to-date | linked-from-cache | exported
    seconds: float


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def model_fingerprint(model_dir: Path) -> str:
    """What the vectors depend on in the model directory (weights, config,
    tokenizer, pooling): shared with rag.embeddings to tell stale vectors."""
    digest = hashlib.sha256()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "modules.json"):
        path = model_dir / name
        digest.update(name.encode())
        digest.update(buildcache.sha256_file(path).encode() if path.is_file() else b"-")
    pooling = model_dir / "1_Pooling" / "config.json"
    if pooling.is_file():
        digest.update(pooling.read_bytes())
    return digest.hexdigest()


def build_inputs(model_dir: Path) -> dict:
    return {
        "model": model_fingerprint(model_dir),
        "exporter": EXPORTER_VERSION,
        "opset": OPSET,
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "transformers": _version("transformers"),
    }


def complete(directory: Path, key: str | None = None) -> dict | None:
    """The manifest of `directory` if it holds a finished export (for `key`)."""
    return buildcache.complete(directory, OUTPUT_FILES, key)


def prepare_embeddings(
    model_dir: Path,
    models_dir: Path,
    cache_dir: Path,
    *,
    force: bool = False,
    progress: Progress = print,
) -> PreparedEmbeddings:
    """Make sure `models_dir/embeddings` holds the int8 ONNX export of
    `model_dir`: up to date already, linked from the cache, or exported now."""
    started = time.perf_counter()
    model_dir, target = Path(model_dir), Path(models_dir) / SUBDIR
    inputs = build_inputs(model_dir)
    key = buildcache.inputs_key(inputs)

    def build(work: Path) -> dict:
        progress(f"Exporting the embedding model to ONNX (int8) into {work.parent}")
        return _build(model_dir, inputs, work, progress)

    manifest, action = buildcache.ensure(
        target, Path(cache_dir) / SUBDIR, key, OUTPUT_FILES, build, force=force
    )
    return PreparedEmbeddings(target, manifest, action, time.perf_counter() - started)


def _build(model_dir: Path, inputs: dict, work: Path, progress: Progress) -> dict:
    started = time.perf_counter()
    fp32 = work / "model.fp32.onnx"
    export_fp32(model_dir, fp32)
    progress(f"  exported fp32 graph ({fp32.stat().st_size / 1e6:.0f} MB)")
    quantize(fp32, work / ONNX_NAME)
    fp32.unlink()
    shutil.copy2(model_dir / TOKENIZER_NAME, work / TOKENIZER_NAME)
    cosine = check_against_reference(model_dir, work)
    progress(f"  int8 vs sentence-transformers: min cosine {cosine:.4f}")
    if cosine < MIN_COSINE:
        raise ExportError(
            f"the int8 export drifts from the model (cosine {cosine:.3f} < {MIN_COSINE})"
        )
    return {
        "inputs": inputs,
        "min_cosine": round(cosine, 5),
        "export_seconds": round(time.perf_counter() - started, 1),
    }


def export_fp32(model_dir: Path, out: Path) -> None:
    """BERT + mean pooling + L2 normalisation as one ONNX graph."""
    import torch
    from transformers import AutoModel

    class Pooled(torch.nn.Module):
        def __init__(self, bert) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            mean = summed / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    bert = AutoModel.from_pretrained(
        str(model_dir), local_files_only=True, attn_implementation="eager"
    )
    module = Pooled(bert.eval())
    ids = torch.ones((2, 16), dtype=torch.long)
    with torch.inference_mode():
        torch.onnx.export(
            module,
            (ids, torch.ones_like(ids)),
            str(out),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "embedding": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )


def quantize(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)


def check_against_reference(model_dir: Path, directory: Path) -> float:
    """Minimum cosine between this export's vectors and sentence-transformers'."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    expected = reference.encode(list(CHECK_SENTENCES), normalize_embeddings=True)
    got = OnnxEncoder(directory).encode(list(CHECK_SENTENCES))
    return float(np.min(np.sum(expected * got, axis=1)))


class OnnxEncoder:
    """The exported model: tokenizer + ONNX Runtime session. Not thread-safe
    for configuration; `encode` itself may be called from any thread."""

    def __init__(self, directory: Path, *, max_tokens: int = 256, threads: int = 0) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        self.max_tokens = max_tokens
        tokenizer = Tokenizer.from_file(str(self.directory / TOKENIZER_NAME))
        tokenizer.enable_truncation(max_length=max_tokens)
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(self.directory / ONNX_NAME), options, providers=["CPUExecutionProvider"]
        )
        small = ort.SessionOptions()
        small.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        small.intra_op_num_threads = 1
        small.inter_op_num_threads = 1
        # Queries run on one thread: on a busy 2-core machine a 2-thread run
        # spends its time waiting for the other thread (see docs/rag.md).
        self._single = ort.InferenceSession(
            str(self.directory / ONNX_NAME), small, providers=["CPUExecutionProvider"]
        )
        self.dimension = int(self._session.get_outputs()[0].shape[1] or 384)

    def encode(self, texts: list[str], batch_size: int = 32, *, single_thread: bool = False):
        import numpy as np

        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        session = self._single if single_thread else self._session
        encodings = self._tokenizer.encode_batch(list(texts))
        # Longest first, like sentence-transformers: batches of similar lengths pad less.
        order = sorted(range(len(texts)), key=lambda i: -len(encodings[i].ids))
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for at in range(0, len(order), batch_size):
            part = order[at : at + batch_size]
            width = max(len(encodings[i].ids) for i in part)
            ids = np.zeros((len(part), width), dtype=np.int64)
            mask = np.zeros((len(part), width), dtype=np.int64)
            for row, i in enumerate(part):
                n = len(encodings[i].ids)
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1
            (vectors,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
            out[part] = vectors
        return out
