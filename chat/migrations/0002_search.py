# Full-text search over messages and titles (chat.search): FTS5 tables and
# triggers on SQLite, generated tsvector columns with GIN indexes on PostgreSQL.
# Existing rows are indexed as the index is created.

from django.db import migrations


def install_search(apps, schema_editor):
    from chat.search import install

    install(schema_editor.connection)


def uninstall_search(apps, schema_editor):
    from chat.search import uninstall

    uninstall(schema_editor.connection)


class Migration(migrations.Migration):

    dependencies = [
        ('chat', '0001_initial'),
    ]

    operations = [
        migrations.RunPython(install_search, uninstall_search),
    ]
