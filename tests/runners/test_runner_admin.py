"""The runner admin: the config list and form, write-only API keys, the
health and test-prompt actions, run records, guardian rules, the dashboard
and key rotation. Runners are real Llama Stack runners against the scripted
HTTP server on 127.0.0.1."""

from __future__ import annotations

import logging
from datetime import timedelta
from io import StringIO

from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

import pytest

from runners import crypto
from runners.admin import shown_endpoint
from runners.models import GuardianRule, RunnerConfig, RunRecord
from runners.stats import percentile, runner_stats
from tests.support.fixtures import runner_config, runner_form
from tests.support.scripted_server import MODELS_ROUTE, Reply, free_port

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.scaleout,
    pytest.mark.usefixtures("fresh_process_state"),
]

API_KEY = "sk-admin-test-0a1b2c3d4e5f6g7h8i9j"
CHANGELIST = "admin:runners_runnerconfig_changelist"


def make_config(endpoint: str, name: str = "remote", **fields) -> RunnerConfig:
    fields = {"priority": 10, "timeout_seconds": 5.0} | fields
    return runner_config(endpoint, name, api_key=API_KEY, **fields)


def send_test_prompt(client, config: RunnerConfig, prompt: str, max_tokens: int = 8):
    """The list's "send a test prompt" action on `config`, the prompt filled in."""
    return client.post(
        reverse(CHANGELIST),
        {
            "action": "send_test_prompt",
            "_selected_action": [config.pk],
            "run_prompt": "1",
            "prompt": prompt,
            "max_tokens": str(max_tokens),
        },
    )


def change_url(config: RunnerConfig) -> str:
    return reverse("admin:runners_runnerconfig_change", args=[config.pk])


# ---- list and form ----------------------------------------------------------------


def test_the_list_shows_capabilities_circuit_and_a_lazy_health_cell_but_never_the_key(
    admin_client, scripted_server
):
    make_config(scripted_server.url, enable_vision=True)
    html = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert "llm, vlm" in html
    assert "runner-circuit-closed" in html
    assert 'data-health-url="/admin/runners/runnerconfig/' in html
    assert "admin/runners/health.js" in html
    assert 'name="form-0-priority"' in html and 'name="form-0-enabled"' in html
    assert API_KEY not in html
    assert "<script>" not in html  # strict CSP: no inline scripts


def test_the_change_page_shows_only_the_masked_key(admin_client, scripted_server):
    config = make_config(scripted_server.url)
    html = admin_client.get(change_url(config)).content.decode()
    assert API_KEY not in html
    assert crypto.mask(API_KEY) in html
    assert 'type="password"' in html


def test_credentials_in_an_endpoint_are_never_listed(admin_client):
    assert shown_endpoint("http://user:pw@host:8321/x") == "http://host:8321/x"


def test_a_blank_key_field_keeps_the_stored_key(admin_client, scripted_server):
    config = make_config(scripted_server.url)
    response = admin_client.post(change_url(config), runner_form(config, priority="7"))
    assert response.status_code == 302
    config.refresh_from_db()
    assert config.priority == 7
    assert config.api_key == API_KEY


def test_a_new_key_replaces_the_old_one_and_is_encrypted_at_rest(admin_client, scripted_server):
    config = make_config(scripted_server.url)
    new_key = "sk-rotated-key-zz99yy88xx77"
    response = admin_client.post(change_url(config), runner_form(config, api_key=new_key))
    assert response.status_code == 302
    config.refresh_from_db()
    assert config.api_key == new_key
    assert new_key not in config.api_key_encrypted


def test_the_clear_key_box_removes_the_key(admin_client, scripted_server):
    config = make_config(scripted_server.url)
    admin_client.post(change_url(config), runner_form(config, clear_api_key="on"))
    config.refresh_from_db()
    assert config.api_key_encrypted == ""
    html = admin_client.get(change_url(config)).content.decode()
    assert "No key stored." in html


def test_a_new_key_and_clear_together_is_refused_without_echoing_the_key(
    admin_client, scripted_server
):
    config = make_config(scripted_server.url)
    new_key = "sk-both-at-once-1234567890"
    response = admin_client.post(
        change_url(config), runner_form(config, api_key=new_key, clear_api_key="on")
    )
    html = response.content.decode()
    assert response.status_code == 200
    assert "Either enter a new key" in html
    assert new_key not in html
    config.refresh_from_db()
    assert config.api_key == API_KEY


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"endpoint": "not a url"}, "Enter an http:// or https:// URL"),
        ({"endpoint": "ftp://example.com"}, "Enter an http:// or https:// URL"),
        ({"endpoint": "http://user:secret@example.com"}, "Do not put credentials in the URL"),
        ({"priority": "-1"}, "greater than or equal to 0"),
        ({"temperature": "2.5"}, "less than or equal to 2.0"),
        ({"temperature": "-0.1"}, "greater than or equal to 0.0"),
        ({"max_tokens": "0"}, "greater than or equal to 1"),
        ({"max_tokens": "40000"}, "less than or equal to 32768"),
        ({"extra_params": "[1, 2]"}, "Extra params must be a JSON object"),
        ({"extra_params": "{not json"}, "Enter a valid JSON."),
        ({"kind": "gpt"}, "Select a valid choice. gpt is not one of the available choices."),
        ({"model_id": ""}, "A Llama Stack runner needs the model id it should use."),
    ],
)
def test_bad_input_gets_a_clear_form_error_and_changes_nothing(
    admin_client, scripted_server, changes, message
):
    config = make_config(scripted_server.url)
    before = RunnerConfig.objects.values().get(pk=config.pk)
    new_key = "sk-typed-during-a-bad-save-42"
    form = runner_form(config, api_key=new_key, **changes)
    response = admin_client.post(change_url(config), form)
    html = response.content.decode()
    assert response.status_code == 200
    assert message in html
    assert new_key not in html and API_KEY not in html
    assert RunnerConfig.objects.values().get(pk=config.pk) == before


def test_priority_and_enabled_are_editable_in_the_list(admin_client, scripted_server):
    config = make_config(scripted_server.url)
    version = config.version
    response = admin_client.post(
        reverse(CHANGELIST),
        {
            "form-TOTAL_FORMS": "1",
            "form-INITIAL_FORMS": "1",
            "form-0-id": str(config.pk),
            "form-0-priority": "42",
            "_save": "Save",
        },
    )
    assert response.status_code == 302
    config.refresh_from_db()
    assert (config.priority, config.enabled) == (42, False)
    assert config.version == version + 1
    assert config.api_key == API_KEY


def test_enabling_an_incomplete_runner_in_the_list_shows_the_error_on_its_row(admin_client):
    config = RunnerConfig.objects.create(name="unset", kind="llamastack", enabled=False)
    response = admin_client.post(
        reverse(CHANGELIST),
        {
            "form-TOTAL_FORMS": "1",
            "form-INITIAL_FORMS": "1",
            "form-0-id": str(config.pk),
            "form-0-priority": "1",
            "form-0-enabled": "on",
            "_save": "Save",
        },
    )
    html = response.content.decode()
    assert response.status_code == 200
    assert "Endpoint: A Llama Stack runner needs an endpoint. (edit the runner)" in html
    config.refresh_from_db()
    assert not config.enabled


def test_a_new_runner_can_be_added_with_a_key(admin_client, scripted_server):
    response = admin_client.post(
        reverse("admin:runners_runnerconfig_add"),
        {
            "name": "added",
            "kind": "llamastack",
            "enabled": "on",
            "priority": "3",
            "model_id": "scripted-model",
            "endpoint": scripted_server.url,
            "api_key": API_KEY,
            "temperature": "0.5",
            "max_tokens": "128",
            "context_tokens": "2048",
            "timeout_seconds": "10",
            "extra_params": '{"seed": 1}',
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    config = RunnerConfig.objects.get(name="added")
    assert config.api_key == API_KEY
    assert config.extra_params == {"seed": 1}


# ---- health ------------------------------------------------------------------------


def test_the_health_endpoint_reports_a_served_model_with_latency(admin_client, scripted_server):
    config = make_config(scripted_server.url)
    url = reverse("admin:runners_runnerconfig_health", args=[config.pk])
    data = admin_client.get(url).json()
    assert data["ok"] is True
    assert "scripted-model" in data["detail"]
    assert data["latency_ms"] >= 0
    assert data["circuit"] == "closed"
    models_call = next(r for r in scripted_server.requests if r.path == MODELS_ROUTE)
    assert models_call.authorization == f"Bearer {API_KEY}"


def test_the_health_endpoint_reports_a_runner_that_is_down(admin_client):
    config = make_config(f"http://127.0.0.1:{free_port()}")
    data = admin_client.get(reverse("admin:runners_runnerconfig_health", args=[config.pk])).json()
    assert data["ok"] is False
    assert "Could not reach" in data["detail"]
    assert API_KEY not in str(data)


def test_the_health_endpoint_is_for_staff_only(client, user, scripted_server):
    config = make_config(scripted_server.url)
    client.force_login(user)
    response = client.get(reverse("admin:runners_runnerconfig_health", args=[config.pk]))
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_the_check_health_action_reports_each_runner(admin_client, scripted_server):
    good = make_config(scripted_server.url, name="good")
    scripted_server.script(Reply(status=500), route=MODELS_ROUTE)
    bad = make_config(scripted_server.url, name="failing")
    response = admin_client.post(
        reverse(CHANGELIST),
        {"action": "check_health", "_selected_action": [good.pk, bad.pk]},
        follow=True,
    )
    html = response.content.decode()
    messages = [str(m) for m in response.context["messages"]]
    assert len(messages) == 2
    assert any(m.startswith("good: healthy:") and " ms; circuit closed)" in m for m in messages)
    assert any(m.startswith("failing: unhealthy:") and "(500)" in m for m in messages)
    assert API_KEY not in html


# ---- test prompt -------------------------------------------------------------------


def test_the_test_prompt_action_asks_for_a_prompt_first(admin_client, scripted_server):
    config = make_config(scripted_server.url)
    response = admin_client.post(
        reverse(CHANGELIST), {"action": "send_test_prompt", "_selected_action": [config.pk]}
    )
    html = response.content.decode()
    assert response.status_code == 200
    assert '<textarea name="prompt"' in html
    assert scripted_server.chat_requests() == []


# The prompt's run record is saved through database_sync_to_async, which
# closes old connections: on PostgreSQL that needs a real transaction.
@pytest.mark.django_db(transaction=True)
def test_the_test_prompt_shows_the_streamed_answer_timings_and_usage(admin_client, scripted_server):
    config = make_config(scripted_server.url)
    scripted_server.script(Reply(text="Hello admin, all good.", token_delay=0.01, usage=(9, 5)))
    response = send_test_prompt(admin_client, config, "Say hello", max_tokens=32)
    html = response.content.decode()
    assert response.status_code == 200
    assert "Hello admin, all good." in html
    assert "Time to first token" in html and " ms</td>" in html
    assert "9 prompt + 5 completion tokens" in html
    assert "stop" in html
    assert API_KEY not in html
    sent = scripted_server.chat_requests()[0].json
    assert sent["messages"][-1]["content"] == "Say hello"
    assert sent["max_tokens"] == 32
    record = RunRecord.objects.get()
    assert (record.source, record.status, record.runner_name) == ("admin", "ok", "remote")


# The prompt's run record is saved through database_sync_to_async, which
# closes old connections: on PostgreSQL that needs a real transaction.
@pytest.mark.django_db(transaction=True)
def test_the_test_prompt_shows_a_runner_error_and_the_partial_answer(admin_client, scripted_server):
    config = make_config(scripted_server.url)
    scripted_server.script(Reply(text="one two three four five", break_after=2))
    response = send_test_prompt(admin_client, config, "Count", max_tokens=32)
    html = response.content.decode()
    assert "Answer (partial)" in html
    assert "one two" in html
    assert "<code>runtime</code>" in html and "broke after 2 tokens" in html
    assert API_KEY not in html
    assert RunRecord.objects.get().status == "failed"


# The prompt's run record is saved through database_sync_to_async, which
# closes old connections: on PostgreSQL that needs a real transaction.
@pytest.mark.django_db(transaction=True)
def test_the_test_prompt_to_a_disabled_runner_says_so(admin_client, scripted_server):
    config = make_config(scripted_server.url, enabled=False)
    response = send_test_prompt(admin_client, config, "Hi")
    assert "is disabled" in response.content.decode()
    assert scripted_server.chat_requests() == []


def test_an_empty_test_prompt_is_a_form_error(admin_client, scripted_server):
    config = make_config(scripted_server.url)
    response = send_test_prompt(admin_client, config, "   ")
    assert "This field is required." in response.content.decode()
    assert scripted_server.chat_requests() == []


def test_staff_who_may_only_view_runners_cannot_send_test_prompts(
    client, django_user_model, scripted_server
):
    config = make_config(scripted_server.url)
    viewer = django_user_model.objects.create_user(
        "viewer", password="viewer-password-123", is_staff=True
    )
    viewer.user_permissions.add(Permission.objects.get(codename="view_runnerconfig"))
    client.force_login(viewer)
    page = client.get(reverse(CHANGELIST)).content.decode()
    assert 'value="check_health"' in page and 'value="send_test_prompt"' not in page
    send_test_prompt(client, config, "Hi")
    assert scripted_server.chat_requests() == []


# ---- logs ----------------------------------------------------------------------------


# The prompt's run record is saved through database_sync_to_async, which
# closes old connections: on PostgreSQL that needs a real transaction.
@pytest.mark.django_db(transaction=True)
def test_the_key_is_never_logged_by_admin_saves_health_checks_or_failures(
    admin_client, scripted_server, caplog
):
    for name in ("", "runners", "httpx", "httpcore", "llama_stack_client", "django"):
        caplog.set_level(logging.DEBUG, logger=name)
    config = make_config(scripted_server.url)
    admin_client.post(change_url(config), runner_form(config, api_key=API_KEY + "x"))
    config.refresh_from_db()
    scripted_server.script(Reply(status=401), Reply(status=500))
    admin_client.get(reverse("admin:runners_runnerconfig_health", args=[config.pk]))
    send_test_prompt(admin_client, config, "Hi")
    assert caplog.records  # the failures were logged...
    assert API_KEY not in caplog.text  # ...without the key


# ---- run records and guardian rules ------------------------------------------------------


def test_run_records_are_browsable_filterable_and_read_only(admin_client):
    RunRecord.objects.create(runner_name="a", status="ok", source="chat", total_ms=120)
    RunRecord.objects.create(
        runner_name="b", status="failed", error_code="timeout", source="api", fallback=True
    )
    url = reverse("admin:runners_runrecord_changelist")

    def shown(**filters) -> list[str]:
        response = admin_client.get(url, filters)
        assert response.status_code == 200
        return [r.runner_name for r in response.context["cl"].result_list]

    assert shown() == ["b", "a"]
    assert shown(status="failed", source="api") == ["b"]
    assert shown(runner_name="a") == ["a"]
    assert shown(fallback__exact="1", error_code="timeout") == ["b"]
    assert shown(created_at__year=str(timezone.now().year)) == ["b", "a"]
    assert "timeout" in admin_client.get(url).content.decode()
    assert admin_client.get(reverse("admin:runners_runrecord_add")).status_code == 403
    record = RunRecord.objects.first()
    page = admin_client.get(reverse("admin:runners_runrecord_change", args=[record.pk]))
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()


def test_the_guardian_rule_form_describes_every_kind(admin_client):
    html = admin_client.get(reverse("admin:runners_guardianrule_add")).content.decode()
    for kind in ("max_length", "block_term", "block_pattern", "mask_term", "mask_pattern"):
        assert f"<b>{kind}</b>" in html


@pytest.mark.parametrize(
    ("kind", "value", "applies_to", "message"),
    [
        ("max_length", "100", "output", "A maximum length applies to input only"),
        ("mask_term", "secret", "input", "Masking applies to the streamed answer only"),
        ("block_pattern", "a*", "both", "This pattern matches empty text"),
        ("block_pattern", "(unclosed", "both", "Not a valid regular expression"),
        ("max_length", "ten", "input", "Enter a positive whole number of characters."),
    ],
)
def test_guardian_rules_that_would_misbehave_are_refused(
    admin_client, kind, value, applies_to, message
):
    response = admin_client.post(
        reverse("admin:runners_guardianrule_add"),
        {"name": "r", "kind": kind, "value": value, "applies_to": applies_to, "enabled": "on"},
    )
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not GuardianRule.objects.exists()


# ---- dashboard ---------------------------------------------------------------------


def _record(name: str, age: timedelta, **fields) -> RunRecord:
    record = RunRecord.objects.create(runner_name=name, **fields)
    RunRecord.objects.filter(pk=record.pk).update(created_at=timezone.now() - age)
    return record


def test_percentiles_interpolate_between_samples():
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    assert percentile([10.0, 20.0, 30.0, 40.0], 50) == 25.0
    assert percentile(list(map(float, range(1, 101))), 95) == pytest.approx(95.05)


def test_runner_stats_cover_each_window_separately(scripted_server):
    make_config(scripted_server.url, name="remote")
    minute = timedelta(minutes=1)
    for ms in (100, 200, 300, 400):
        _record(
            "remote",
            minute,
            status="ok",
            total_ms=ms,
            time_to_first_token_ms=ms / 10,
            tokens_per_second=20.0,
        )
    _record("remote", minute, status="failed", error_code="timeout", fallback=False)
    _record(
        "remote",
        timedelta(hours=3),
        status="ok",
        total_ms=5000,
        fallback=True,
        tokens_per_second=10.0,
    )
    _record("remote", timedelta(days=2), status="ok", total_ms=9999)
    now = timezone.now()
    hour = {s.runner: s for s in runner_stats(now - timedelta(hours=1), now)}["remote"]
    assert (hour.requests, hour.ok, hour.failed) == (5, 4, 1)
    assert hour.error_rate == pytest.approx(0.2)
    assert hour.p50_ms == pytest.approx(250)
    assert hour.p95_ms == pytest.approx(385)
    assert hour.p50_ttft_ms == pytest.approx(25)
    assert hour.mean_tokens_per_second == pytest.approx(20)
    assert (hour.as_fallback, hour.failed_before_first_token) == (0, 1)
    day = {s.runner: s for s in runner_stats(now - timedelta(days=1), now)}["remote"]
    assert (day.requests, day.as_fallback) == (6, 1)
    assert day.mean_tokens_per_second == pytest.approx((20 * 4 + 10) / 5)


def test_the_dashboard_shows_per_runner_figures_for_the_hour_and_the_day(
    admin_client, scripted_server
):
    make_config(scripted_server.url, name="remote")
    RunnerConfig.objects.create(name="idle", kind="executorch", priority=1)
    _record("remote", timedelta(minutes=5), status="ok", total_ms=1234, tokens_per_second=42.0)
    _record("remote", timedelta(minutes=5), status="failed", error_code="unavailable")
    _record("gone", timedelta(hours=5), status="ok", total_ms=10)
    response = admin_client.get(reverse("runners-dashboard"))
    html = response.content.decode()
    assert response.status_code == 200
    hour_table = html.split('id="runner-stats-1"')[1].split("</table>")[0]
    day_table = html.split('id="runner-stats-2"')[1].split("</table>")[0]
    assert 'data-runner="remote"' in hour_table and "1234 ms" in hour_table
    assert "50%" in hour_table and "42.0" in hour_table
    assert 'data-runner="idle"' in hour_table
    assert 'data-runner="gone"' not in hour_table and 'data-runner="gone"' in day_table
    assert "<script" not in html.split('id="content-main"')[1]


def test_the_dashboard_is_for_staff_with_run_record_permission(client, user, django_user_model):
    client.force_login(user)
    assert client.get(reverse("runners-dashboard")).status_code == 302
    staff = django_user_model.objects.create_user(
        "staff", password="staff-password-123", is_staff=True
    )
    client.force_login(staff)
    assert client.get(reverse("runners-dashboard")).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_runrecord"))
    staff = django_user_model.objects.get(pk=staff.pk)
    client.force_login(staff)
    assert client.get(reverse("runners-dashboard")).status_code == 200


def test_the_admin_index_and_runner_pages_link_to_the_dashboard(admin_client):
    url = reverse("runners-dashboard")
    assert url in admin_client.get(reverse("admin:index")).content.decode()
    assert url in admin_client.get(reverse("admin:app_list", args=["runners"])).content.decode()
    assert url in admin_client.get(reverse(CHANGELIST)).content.decode()


# ---- key rotation ------------------------------------------------------------------


OLD_SECRET = "old-secret-key-for-rotation-test-0123456789abcdef"
NEW_SECRET = "new-secret-key-for-rotation-test-fedcba9876543210"


def test_rotating_secret_key_re_encrypts_keys_under_the_new_secret():
    with override_settings(SECRET_KEY=OLD_SECRET, SECRET_KEY_FALLBACKS=[]):
        config = RunnerConfig.objects.create(name="r", kind="llamastack")
        config.api_key = API_KEY
        config.save()
    version = RunnerConfig.objects.get().version
    out = StringIO()
    with override_settings(SECRET_KEY=NEW_SECRET, SECRET_KEY_FALLBACKS=[OLD_SECRET]):
        assert RunnerConfig.objects.get().api_key == API_KEY  # readable through the fallback
        call_command("rotate_runner_keys", stdout=out)
    assert "Re-encrypted 1 runner API key(s)" in out.getvalue()
    assert API_KEY not in out.getvalue()
    with override_settings(SECRET_KEY=NEW_SECRET, SECRET_KEY_FALLBACKS=[]):
        config = RunnerConfig.objects.get()
        assert config.api_key == API_KEY
        assert config.version == version  # same key: no runner rebuild


def test_a_key_no_secret_can_decrypt_is_reported_by_runner_name():
    with override_settings(SECRET_KEY=OLD_SECRET, SECRET_KEY_FALLBACKS=[]):
        config = RunnerConfig.objects.create(name="lost", kind="llamastack")
        config.api_key = API_KEY
        config.save()
        stored = config.api_key_encrypted
    with (
        override_settings(SECRET_KEY=NEW_SECRET, SECRET_KEY_FALLBACKS=[]),
        pytest.raises(CommandError) as info,
    ):
        call_command("rotate_runner_keys", stdout=StringIO())
    assert "lost" in str(info.value) and API_KEY not in str(info.value)
    assert RunnerConfig.objects.get().api_key_encrypted == stored  # untouched


def test_the_admin_says_when_a_stored_key_cannot_be_decrypted(admin_client):
    with override_settings(SECRET_KEY=OLD_SECRET, SECRET_KEY_FALLBACKS=[]):
        config = RunnerConfig.objects.create(name="lost", kind="llamastack")
        config.api_key = API_KEY
        config.save()
    html = admin_client.get(change_url(config)).content.decode()
    assert "cannot be decrypted with the current SECRET_KEY" in html
