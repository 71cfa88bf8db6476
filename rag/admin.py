from django.contrib import admin

from rag.models import Collection, Document


@admin.register(Collection)
class CollectionAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "shared", "is_personal", "top_k", "score_floor")
    list_filter = ("shared", "is_personal")


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = ("title", "collection", "owner", "status", "chunk_count", "size", "created_at")
    list_filter = ("status", "collection")
    search_fields = ("title", "sha256")
