from django.apps import AppConfig


class BreezeWebConfig(AppConfig):
    name = "breezeweb"
    verbose_name = "Chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Revoking a key, logging out or deactivating a user ends its websockets.
        from breezeweb.ws_revocation import connect_receivers

        connect_receivers()
