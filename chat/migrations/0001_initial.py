# Conversation and Message moved here from the `breezeweb` app. The tables keep
# their names (db_table), so this only records the models in the new app's
# state; no table is created or copied. Content types follow the models, so
# permissions and admin history stay attached.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def _move_content_types(apps, schema_editor, *, old: str, new: str, names: tuple[str, ...]):
    ContentType = apps.get_model("contenttypes", "ContentType")
    for name in names:
        if ContentType.objects.filter(app_label=new, model=name).exists():
            continue
        ContentType.objects.filter(app_label=old, model=name).update(app_label=new)


def forwards(apps, schema_editor):
    _move_content_types(apps, schema_editor, old="breezeweb", new="chat", names=("conversation", "message"))


def backwards(apps, schema_editor):
    _move_content_types(apps, schema_editor, old="chat", new="breezeweb", names=("conversation", "message"))


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ('breezeweb', '0002_initial'),
        ('contenttypes', '0002_remove_content_type_name'),
        ('rag', '0001_initial'),
        ('runners', '0001_initial'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[
                migrations.CreateModel(
                    name='Conversation',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('title', models.CharField(default='New chat', max_length=200)),
                        ('rag_enabled', models.BooleanField(default=False)),
                        ('created_at', models.DateTimeField(auto_now_add=True)),
                        ('updated_at', models.DateTimeField(auto_now=True)),
                        ('collections', models.ManyToManyField(blank=True, related_name='+', to='rag.collection')),
                        ('owner', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='conversations', to=settings.AUTH_USER_MODEL)),
                        ('pinned_runner', models.ForeignKey(blank=True, help_text='Answer with this runner only; empty means the router chooses.', null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='runners.runnerconfig')),
                    ],
                    options={
                        'db_table': 'breezeweb_conversation',
                        'ordering': ['-updated_at'],
                        'indexes': [models.Index(fields=['owner', '-updated_at'], name='breezeweb_c_owner_i_fdbc7e_idx')],
                    },
                ),
                migrations.CreateModel(
                    name='Message',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('role', models.CharField(choices=[('system', 'System'), ('user', 'User'), ('assistant', 'Assistant'), ('tool', 'Tool')], max_length=16)),
                        ('content', models.TextField(blank=True)),
                        ('images', models.JSONField(blank=True, default=list, help_text='Attached images as data URLs.')),
                        ('status', models.CharField(choices=[('complete', 'Complete'), ('streaming', 'Streaming'), ('stopped', 'Stopped'), ('failed', 'Failed')], default='complete', max_length=16)),
                        ('runner_name', models.CharField(blank=True, max_length=100)),
                        ('model_id', models.CharField(blank=True, max_length=200)),
                        ('fallback', models.BooleanField(default=False)),
                        ('finish_reason', models.CharField(blank=True, max_length=32)),
                        ('prompt_tokens', models.PositiveIntegerField(blank=True, null=True)),
                        ('completion_tokens', models.PositiveIntegerField(blank=True, null=True)),
                        ('time_to_first_token_ms', models.FloatField(blank=True, null=True)),
                        ('tokens_per_second', models.FloatField(blank=True, null=True)),
                        ('total_ms', models.FloatField(blank=True, null=True)),
                        ('sources', models.JSONField(blank=True, default=list)),
                        ('error_code', models.CharField(blank=True, max_length=32)),
                        ('error', models.TextField(blank=True)),
                        ('created_at', models.DateTimeField(auto_now_add=True)),
                        ('updated_at', models.DateTimeField(auto_now=True)),
                        ('conversation', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='messages', to='chat.conversation')),
                    ],
                    options={
                        'db_table': 'breezeweb_message',
                        'ordering': ['created_at', 'id'],
                        'indexes': [models.Index(fields=['conversation', 'created_at'], name='breezeweb_m_convers_e59448_idx')],
                    },
                ),
            ],
        ),
        migrations.RunPython(forwards, backwards, elidable=False),
    ]
