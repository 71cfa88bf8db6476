from django.apps import AppConfig


class BreezeWebConfig(AppConfig):
    name = "breezeweb"
    verbose_name = "BreezeWeb"
    default_auto_field = "django.db.models.BigAutoField"
