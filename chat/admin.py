from django.contrib import admin

from chat.models import Conversation, Message, Project, RunnerPrice


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    fields = ("role", "status", "content", "runner_name", "model_id", "completion_tokens")
    readonly_fields = fields
    show_change_link = True


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("title", "owner", "project", "pinned", "pinned_runner", "updated_at")
    list_filter = ("pinned_runner", "pinned")
    search_fields = ("title", "owner__username")
    raw_id_fields = ("owner", "project")
    inlines = [MessageInline]


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "runner", "rag_enabled", "updated_at")
    search_fields = ("name", "owner__username")
    raw_id_fields = ("owner",)
    filter_horizontal = ("collections",)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("__str__", "conversation", "role", "status", "runner_name", "created_at")
    list_filter = ("role", "status", "runner_name")
    search_fields = ("content",)
    raw_id_fields = ("conversation",)


@admin.register(RunnerPrice)
class RunnerPriceAdmin(admin.ModelAdmin):
    """Prices per runner: each answer of a priced runner shows its cost to the user."""

    list_display = ("runner", "currency", "prompt_per_million", "completion_per_million")
