from django.apps import AppConfig


class RunnersConfig(AppConfig):
    name = "runners"
    verbose_name = "Inference runners"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # What every turn reads is memoized per process (core.generation):
        # a change to any of it, in any process, makes every process read it again.
        from core import generation
        from runners.models import GuardianRule, RunnerConfig

        generation.watch(RunnerConfig, RunnerConfig.groups.through, GuardianRule)
