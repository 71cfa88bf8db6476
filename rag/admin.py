"""Admin: collections, and documents with status, progress, chunk count and
error; upload from the admin; actions re-ingest and delete (chunks included)."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _

from rag import uploads, worker
from rag.models import Collection, Document
from rag.uploads import UploadRejected


@admin.register(Collection)
class CollectionAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "owner",
        "shared",
        "is_personal",
        "search_mode",
        "keyword_weight",
        "top_k",
        "rerank",
        "score_floor",
        "documents",
    )
    list_filter = ("shared", "is_personal", "search_mode")
    fieldsets = (
        (None, {"fields": ("name", "owner", "shared", "groups")}),
        (
            _("Retrieval"),
            {
                "fields": ("search_mode", "keyword_weight", "top_k", "rerank", "score_floor"),
                "description": "Hybrid (the default) fuses keyword (BM25) and vector search; "
                "see docs/rag.md.",
            },
        ),
    )
    search_fields = ("name", "owner__username")
    filter_horizontal = ("groups",)

    @admin.display(description=_("Documents"))
    def documents(self, obj: Collection) -> int:
        return obj.documents.count()


class DocumentUploadForm(forms.ModelForm):
    """Adding a document in the admin = uploading a file (same checks as the API)."""

    upload = forms.FileField(help_text="A .txt, .md, .pdf, .html or .docx file.")

    class Meta:
        model = Document
        fields = ("collection",)

    def clean(self):
        cleaned = super().clean()
        upload, target = cleaned.get("upload"), cleaned.get("collection")
        if upload is not None and target is not None:
            staged = None
            try:
                staged = uploads.stage_chunks(upload.chunks(), upload.name)
                uploads.check_staged(target, staged)
            except UploadRejected as exc:
                if staged is not None:
                    staged.discard()
                raise forms.ValidationError(exc.message, code=exc.code) from None
            self.staged = staged
        return cleaned


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = (
        "title",
        "collection",
        "owner",
        "status",
        "progress_percent",
        "chunk_count",
        "page_count",
        "size",
        "short_error",
        "created_at",
    )
    list_filter = ("status", "collection")
    search_fields = ("title", "sha256")
    actions = ("reingest_selected", "delete_with_chunks")
    readonly_fields = (
        "title",
        "owner",
        "file",
        "sha256",
        "size",
        "mime",
        "status",
        "progress",
        "error",
        "chunk_count",
        "page_count",
        "created_at",
        "updated_at",
    )

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = DocumentUploadForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("collection", "upload")
        return ("collection", *self.readonly_fields)

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        return ("collection", *self.readonly_fields)

    def changelist_view(self, request, extra_context=None):
        worker.ensure_started()  # resume unfinished ingestion on first use
        return super().changelist_view(request, extra_context)

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        try:
            document = uploads.add_document(request.user, obj.collection, form.staged)
        except UploadRejected as exc:
            # Checked after validation (content, duplicates): report, save nothing.
            self.message_user(request, exc.message, messages.ERROR)
            obj.pk = None
            return
        obj.__dict__.update({k: v for k, v in document.__dict__.items() if k != "_state"})
        obj._state.adding = False

    def response_add(self, request, obj, post_url_continue=None):
        if obj.pk is None:
            from django.http import HttpResponseRedirect

            return HttpResponseRedirect(request.path)
        return super().response_add(request, obj, post_url_continue)

    def log_addition(self, request, obj, message):
        if obj.pk is not None:
            return super().log_addition(request, obj, message)
        return None

    @admin.display(description=_("Progress"))
    def progress_percent(self, obj: Document) -> str:
        if obj.status == Document.Status.PROCESSING:
            return f"{obj.progress * 100:.0f}%"
        return "100%" if obj.status == Document.Status.READY else "—"

    @admin.display(description=_("Error"))
    def short_error(self, obj: Document):
        if not obj.error:
            return ""
        return format_html('<span title="{}">{}</span>', obj.error, obj.error[:60])

    @admin.action(description=_("Re-ingest selected documents"))
    def reingest_selected(self, request, queryset):
        count = self._each(queryset, uploads.reingest)
        self.message_user(request, f"{count} document(s) queued for ingestion.")

    @admin.action(description=_("Delete selected documents (file and chunks)"))
    def delete_with_chunks(self, request, queryset):
        count = self._each(queryset, uploads.delete_document)
        self.message_user(request, f"{count} document(s) deleted with their chunks.")

    @staticmethod
    def _each(queryset, act) -> int:
        documents = list(queryset.select_related("collection"))
        for document in documents:
            act(document)
        return len(documents)

    def delete_model(self, request, obj):
        uploads.delete_document(obj)

    def delete_queryset(self, request, queryset):
        for document in queryset.select_related("collection"):
            uploads.delete_document(document)

    def has_change_permission(self, request, obj=None):
        # Documents are immutable records of an upload; only their collection
        # is chosen, at upload time.
        return obj is None and super().has_change_permission(request, obj)
