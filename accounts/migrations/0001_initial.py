# ApiKey moved here from the `breezeweb` app. The table keeps its name
# (db_table), so this only records the model in the new app's state; its
# content type follows it.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def _move(apps, old: str, new: str):
    ContentType = apps.get_model("contenttypes", "ContentType")
    if not ContentType.objects.filter(app_label=new, model="apikey").exists():
        ContentType.objects.filter(app_label=old, model="apikey").update(app_label=new)


def forwards(apps, schema_editor):
    _move(apps, "breezeweb", "accounts")


def backwards(apps, schema_editor):
    _move(apps, "accounts", "breezeweb")


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ('breezeweb', '0002_initial'),
        ('contenttypes', '0002_remove_content_type_name'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[
                migrations.CreateModel(
                    name='ApiKey',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('name', models.CharField(max_length=100)),
                        ('prefix', models.CharField(help_text='First characters, to recognise a key.', max_length=16)),
                        ('key_hash', models.CharField(editable=False, max_length=64, unique=True)),
                        ('created_at', models.DateTimeField(auto_now_add=True)),
                        ('last_used_at', models.DateTimeField(blank=True, null=True)),
                        ('revoked_at', models.DateTimeField(blank=True, null=True)),
                        ('user', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='api_keys', to=settings.AUTH_USER_MODEL)),
                    ],
                    options={
                        'db_table': 'breezeweb_apikey',
                        'verbose_name': 'API key',
                        'ordering': ['-created_at'],
                    },
                ),
            ],
        ),
        migrations.RunPython(forwards, backwards, elidable=False),
    ]
