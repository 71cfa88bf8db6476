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
