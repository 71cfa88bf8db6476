"""Document collections and documents. Chunks and vectors live in Chroma, one
Chroma collection per BreezeWeb collection, so access control never needs a
per-query metadata filter."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Exists, OuterRef, Q

from core.fields import optional_link


class CollectionQuerySet(models.QuerySet["Collection"]):
    def readable_by(self, user) -> CollectionQuerySet:
        """Collections whose chunks `user` may retrieve: their own, and shared
        ones open to everyone (no groups) or to one of the user's groups (every
        collection for a superuser). Retrieval, search, the documents API and
        the chat all ask this one rule."""
        if user.is_superuser:
            return self.all()
        restricted = Collection.groups.through.objects.filter(collection=OuterRef("pk"))
        mine = restricted.filter(group__in=user.groups.values("pk"))
        return self.filter(Q(owner=user) | Q(shared=True) & (~Exists(restricted) | Exists(mine)))


class SearchMode(models.TextChoices):
    VECTOR = "vector", "Vector (meaning)"
    KEYWORD = "keyword", "Keyword (BM25 over words, stemmed)"
    HYBRID = "hybrid", "Hybrid (both, fused)"


class Collection(models.Model):
    name = models.CharField(max_length=200)
    owner = optional_link(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="collections",
        help_text="Empty for a shared collection managed by admins.",
    )
    shared = models.BooleanField(
        default=False, help_text="Readable by every user (or only by its groups' members)."
    )
    groups = models.ManyToManyField(
        "auth.Group",
        blank=True,
        related_name="collections",
        help_text="A shared collection with groups is readable only by their members "
        "(and superusers); to everyone else it does not exist. Empty: every user.",
    )
    is_personal = models.BooleanField(default=False, editable=False)
    top_k = models.PositiveSmallIntegerField(default=5)
    # 0.2: the int8 ONNX embeddings score a paraphrased question's answer
    # about 0.02 lower than the fp32 model does (0.24 vs 0.26 for "How many
    # stairs did the warden ascend?" against "climbed 214 steps").
    score_floor = models.FloatField(
        default=0.2, help_text="Chunks less similar than this (cosine, 0-1) are left out."
    )
    search_mode = models.CharField(
        max_length=8,
        choices=SearchMode.choices,
        default=SearchMode.HYBRID,
        db_default=SearchMode.HYBRID,
        help_text="How chunks are found: by meaning, by exact words, or both fused (default).",
    )
    keyword_weight = models.FloatField(
        default=0.5,
        db_default=0.5,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Hybrid only: the keyword signal's share of the fused rank (0-1); "
        "the vector signal gets the rest.",
    )
    rerank = models.BooleanField(
        default=True,
        db_default=True,
        help_text="Re-order the fused candidates by how fully they cover the question's "
        "terms and identifiers (see docs/rag.md).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = CollectionQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["owner"],
                condition=Q(is_personal=True),
                name="one_personal_collection_per_user",
            )
        ]

    def __str__(self) -> str:
        return self.name

    def writable_by(self, user) -> bool:
        """Who may add or remove documents: the owner; staff for shared collections."""
        if user.is_superuser:
            return True
        if self.owner_id is not None:
            return self.owner_id == user.pk
        return bool(user.is_staff)

    @property
    def chroma_name(self) -> str:
        return f"bw_collection_{self.pk}"

    @classmethod
    def personal_for(cls, user) -> Collection:
        coll, _ = cls.objects.get_or_create(
            owner=user, is_personal=True, defaults={"name": f"{user.get_username()}'s documents"}
        )
        return coll


def _upload_to(instance: Document, filename: str) -> str:
    # Never trust the client's name for the path: sha256-addressed storage.
    return f"documents/{instance.collection_id}/{instance.sha256}"


class Document(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        PROCESSING = "processing"
        READY = "ready"
        FAILED = "failed"

    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="documents")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="documents"
    )
    title = models.CharField(max_length=255, help_text="The uploaded file's name (sanitised).")
    file = models.FileField(upload_to=_upload_to, max_length=300)
    sha256 = models.CharField(max_length=64)
    size = models.PositiveBigIntegerField(default=0)
    mime = models.CharField(max_length=100, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    progress = models.FloatField(default=0.0, help_text="0-1 while processing.")
    error = models.TextField(blank=True)
    chunk_count = models.PositiveIntegerField(default=0)
    page_count = models.PositiveIntegerField(null=True, blank=True)
    # The ingestion run that owns this document right now: its chunks carry the
    # same token as `generation`, so a superseded or deleted run can tell and
    # clean up after itself (re-ingest swaps generations atomically).
    ingest_token = models.CharField(max_length=32, blank=True, editable=False)
    # Last sign of life: set when the document is queued and every few seconds
    # by the run that owns it. The watchdog (rag.worker) settles a document
    # whose run stopped beating (a crashed worker, process or thread).
    heartbeat_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Runs started since a person last asked for this document to be indexed
    # (upload or re-ingest); a document whose runs keep dying is failed.
    attempts = models.PositiveSmallIntegerField(default=0, editable=False)
    # The generation retrieval answers from: set in the same transaction that
    # marks the document ready and swaps its lexical rows, so both indexes
    # switch generations at once (a stale vector hit is dropped by this check).
    live_generation = models.CharField(
        max_length=32, blank=True, default="", db_default="", editable=False
    )
    # What produced the live chunks (chunk format + embedding model); empty
    # for documents indexed before hybrid search. A different value means the
    # vectors would change: the document is re-indexed (rag.worker).
    index_version = models.CharField(
        max_length=64, blank=True, default="", db_default="", editable=False
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["collection", "sha256"], name="unique_file_per_collection"
            )
        ]
        indexes = [models.Index(fields=["status"]), models.Index(fields=["owner", "-created_at"])]

    def __str__(self) -> str:
        return self.title


class Chunk(models.Model):
    """The lexical side of a chunk: what the keyword index (SQLite FTS5 or
    PostgreSQL full-text search) searches, one row per chunk of a document's
    live generation. Rows are swapped in the same transaction that makes a
    generation live, and go with their document (cascade), so the keyword
    index never answers from a stale or deleted generation."""

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="+")
    generation = models.CharField(max_length=32)
    chunk_index = models.PositiveIntegerField()
    chroma_id = models.CharField(max_length=100, help_text="The same chunk's id in Chroma.")
    page = models.PositiveIntegerField(null=True, blank=True)
    section = models.TextField(blank=True, help_text="The heading path.")
    context = models.TextField(blank=True, help_text="Title and heading path: indexed only.")
    text = models.TextField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["document", "generation", "chunk_index"], name="unique_chunk_per_generation"
            )
        ]

    def __str__(self) -> str:
        return self.chroma_id
