# Conversation and Message now live in the `chat` app, ApiKey in `accounts`;
# their tables stay where they are. This removes them from this app's state.

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('accounts', '0001_initial'),
        ('breezeweb', '0002_initial'),
        ('chat', '0001_initial'),
        ('runners', '0002_runrecord_message_in_chat'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[
                migrations.DeleteModel(name='Message'),
                migrations.DeleteModel(name='Conversation'),
                migrations.DeleteModel(name='ApiKey'),
            ],
        ),
    ]
