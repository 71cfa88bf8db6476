from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Revoking a key, logging out or deactivating a user ends its websockets.
        from accounts import firstrun, revocation, selfservice

        revocation.connect_receivers()
        selfservice.connect_receivers()  # sessions recorded at sign-in, ended on deactivation
        firstrun.connect_receivers()  # the first account, however created, closes /setup/
        # Quotas, group membership and API keys (with their users) are
        # memoized per process (core.generation).
        from django.contrib.auth import get_user_model
        from django.contrib.auth.models import Group

        from accounts.models import ApiKey, Quota
        from core import generation

        user_model = get_user_model()
        generation.watch(Quota, Group, user_model.groups.through, ApiKey, user_model)
