"""core.generation: what every turn reads is memoized per process and read
again after any change, in any process, including changes made while a read
was under way and bulk writes that send no signal."""

from __future__ import annotations

import httpx
import pytest

from accounts.models import Quota
from core import generation
from runners.models import GuardianRule, RunnerConfig
from runners.router import usable_configs
from tests.support.fixtures import runner_config
from tests.support.processes import WebServer, manage, site_env

db = pytest.mark.django_db(transaction=True)
# Both passes: the stamp is a file on the embedded defaults, a Redis key with REDIS_URL.
pytestmark = pytest.mark.scaleout


class Loads:
    """A loader that counts its calls and returns the call number."""

    def __init__(self, during=None) -> None:
        self.calls = 0
        self.during = during

    def __call__(self) -> int:
        self.calls += 1
        if self.during:
            self.during()
        return self.calls


def test_a_value_is_loaded_once_per_stamp():
    load = Loads()
    assert [generation.memo("k", load) for _ in range(3)] == [1, 1, 1]
    generation.bump()
    assert generation.memo("k", load) == 2
    assert generation.memo("k", load) == 2


def test_a_change_during_a_load_makes_the_next_call_load_again():
    """A load that read the database before a change committed is stored under
    the stamp the change replaces: it is never served after the change."""
    racing = Loads(during=generation.bump)
    assert generation.memo("k", racing) == 1
    assert generation.memo("k", racing) == 2


def test_one_stamp_reads_the_version_once_for_the_block(monkeypatch):
    """Inside `one_stamp()` every memo uses the stamp read on entry: one read
    however many memos, and one version of everything; after the block a
    change made meanwhile is seen at once."""
    reads = []
    real = generation.stamp
    monkeypatch.setattr(generation, "stamp", lambda: reads.append(1) or real())
    load = Loads()
    with generation.one_stamp():
        with generation.one_stamp():  # nested: the outer block's read
            first = [generation.memo(("k", i), load) for i in range(5)]
        generation.bump()  # another request's change, in the middle of the block
        assert generation.memo(("k", 0), load) == first[0]  # still the block's version
    assert len(reads) == 1
    assert first == [1, 2, 3, 4, 5]
    assert generation.memo(("k", 0), load) == 6  # after the block: the change counts


def test_the_stamp_is_a_file_every_process_of_the_machine_reads(settings, tmp_path):
    settings.DATA_DIR = tmp_path
    settings.REDIS_URL = ""
    load = Loads()
    generation.memo("k", load)
    # Another process (a `manage.py` command) records a change: the file changes.
    (tmp_path / "config-generation").write_text("written by another process")
    assert generation.memo("k", load) == 2


@db
def test_saves_deletes_relations_and_bulk_updates_all_bump(user):
    from django.contrib.auth.models import Group

    def changes(action) -> bool:
        before = generation.stamp()
        action()
        return generation.stamp() != before

    config = runner_config("http://127.0.0.1:9", "remote")
    group = Group.objects.create(name="team")
    assert changes(lambda: RunnerConfig.objects.filter(pk=config.pk).update(priority=3))
    assert changes(lambda: config.groups.add(group))
    assert changes(lambda: user.groups.add(group))
    assert changes(lambda: GuardianRule.objects.create(name="r", kind="block_term", value="x"))
    assert changes(lambda: GuardianRule.objects.update(enabled=False))
    quota = {"metric": "messages", "period": "day", "limit": 1}
    assert changes(lambda: Quota.objects.create(user=user, **quota))
    assert changes(group.delete)
    assert changes(config.delete)


@db
def test_who_may_use_a_runner_follows_group_changes_at_once(user):
    from django.contrib.auth.models import Group

    open_runner = runner_config("http://127.0.0.1:9", "open")
    team_runner = runner_config("http://127.0.0.1:9", "team-only")
    team = Group.objects.create(name="team")
    team_runner.groups.add(team)
    assert [c.name for c in usable_configs(user)] == ["open"]
    user.groups.add(team)
    assert {c.name for c in usable_configs(user)} == {"open", "team-only"}
    team.user_set.remove(user)
    assert [c.name for c in usable_configs(user)] == ["open"]
    open_runner.delete()
    assert usable_configs(user) == []


@db
def test_a_server_sees_an_edit_made_by_a_manage_py_command_on_its_next_request(
    tmp_path, scripted_server
):
    """The embedded default: one uvicorn process; `manage.py shell` in another
    process disables a runner with a bulk update and adds a guardian rule."""
    env = site_env(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'site.sqlite3'}")
    manage(env, "migrate", "--noinput")
    key = (
        manage(
            env,
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model;"
            "from accounts.models import ApiKey; from runners.models import RunnerConfig;"
            "u = get_user_model().objects.create_user('ann', password='pw-123456789');"
            f"RunnerConfig.objects.create(name='remote', kind='llamastack',"
            f" endpoint='{scripted_server.url}', model_id='scripted-model', priority=5);"
            "print('KEY' + ApiKey.issue(u, 'k')[1])",
        )
        .split("KEY", 1)[1]
        .strip()
    )
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "remote", "messages": [{"role": "user", "content": "say classified"}]}
    site = WebServer(env).start()
    try:
        models = httpx.get(f"{site.url}/v1/models", headers=headers).json()["data"]
        assert "remote" in [m["id"] for m in models]
        assert httpx.post(f"{site.url}/v1/chat/completions", headers=headers, json=body).is_success

        manage(
            env,
            "shell",
            "-c",
            "from runners.models import GuardianRule;"
            "GuardianRule.objects.create(name='no', kind='block_term', value='classified',"
            " applies_to='input')",
        )
        refused = httpx.post(f"{site.url}/v1/chat/completions", headers=headers, json=body)
        assert refused.status_code == 400, refused.text

        manage(
            env,
            "shell",
            "-c",
            "from runners.models import RunnerConfig;"
            "RunnerConfig.objects.filter(name='remote').update(enabled=False)",
        )
        models = httpx.get(f"{site.url}/v1/models", headers=headers).json()["data"]
        assert "remote" not in [m["id"] for m in models]
    finally:
        site.stop()
