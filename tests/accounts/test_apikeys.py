"""API keys: the settings page (create, list, revoke; the raw key shown once)
and the admin, where staff see and revoke every key."""

from __future__ import annotations

import logging
import re

from django.test import Client
from django.utils.formats import date_format

import pytest

from accounts.models import ApiKey
from api.apikeys import MAX_ACTIVE_KEYS

pytestmark = [pytest.mark.django_db, pytest.mark.scaleout]

PAGE = "/settings/api-keys/"
RAW_KEY = re.compile(r"bw_[A-Za-z0-9_-]{40,}")


@pytest.fixture
def browser(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_the_page_requires_login(client):
    response = client.get(PAGE)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_creating_a_key_shows_it_once_and_stores_only_its_hash(browser, user, caplog):
    caplog.set_level(logging.DEBUG)
    response = browser.post(PAGE, {"name": "laptop scripts"})
    assert response.status_code == 201
    assert "no-store" in response["Cache-Control"]
    html = response.content.decode()
    raw = RAW_KEY.search(html).group(0)
    assert "shown only this once" in html
    key = ApiKey.objects.get(user=user)
    assert key.name == "laptop scripts"
    assert raw.startswith(key.prefix)
    assert raw not in (key.key_hash, key.prefix)
    assert len(key.key_hash) == 64
    # The key works, and is never shown again, nor logged.
    assert Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 200
    again = browser.get(PAGE).content.decode()
    assert raw not in again and key.prefix in again
    assert raw not in caplog.text


def test_the_list_shows_prefix_created_and_last_used(browser, user):
    key, raw = ApiKey.issue(user, "ci")
    page = browser.get(PAGE).content.decode()
    assert "ci" in page and f"{key.prefix}…" in page and "never" in page
    Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {raw}")
    key.refresh_from_db()
    assert key.last_used_at is not None
    page = browser.get(PAGE).content.decode()
    # Shown in the page's language (English here), with the exact time in the markup.
    shown = date_format(key.last_used_at, "SHORT_DATETIME_FORMAT")
    assert f'<time datetime="{key.last_used_at.isoformat()}">{shown}</time>' in page
    assert "never" not in page


def test_the_list_speaks_traditional_chinese_with_taiwanese_dates(
    browser, user, compiled_translations
):
    key, _ = ApiKey.issue(user, "ci")
    page = browser.get(PAGE, HTTP_ACCEPT_LANGUAGE="zh-TW,zh;q=0.9").content.decode()
    assert '<html lang="zh-hant"' in page
    assert "你的金鑰" in page and "從未使用" in page and "Your keys" not in page
    created = key.created_at
    assert f"{created.year}年{created.month}月{created.day}日" in page  # zh_Hant's date format


def test_a_key_needs_a_name_and_a_bad_form_creates_nothing(browser, user):
    response = browser.post(PAGE, {"name": "   "})
    assert response.status_code == 400
    assert "This field is required." in response.content.decode()
    response = browser.post(PAGE, {"name": "x" * 101})
    assert response.status_code == 400
    assert "at most 100 characters" in response.content.decode()
    assert not ApiKey.objects.exists()


def test_a_keys_name_is_saved_without_control_characters(browser, user):
    response = browser.post(PAGE, {"name": "ci\x1b[31m\tjobs\u2028\x85 nightly\r\n"})
    assert response.status_code == 201
    assert ApiKey.objects.get(user=user).name == "ci [31m jobs nightly"
    # A name of nothing but control characters is no name.
    response = browser.post(PAGE, {"name": "\x07\x1b\u2029"})
    assert response.status_code == 400
    assert "This field is required." in response.content.decode()
    assert ApiKey.objects.count() == 1


def test_the_forms_are_csrf_protected(user):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    assert strict.post(PAGE, {"name": "sneaky"}).status_code == 403
    key, _ = ApiKey.issue(user, "mine")
    assert strict.post(f"{PAGE}{key.pk}/revoke/").status_code == 403
    key.refresh_from_db()
    assert key.revoked_at is None
    assert ApiKey.objects.count() == 1


def test_revoking_a_key_stops_it_working_at_once(browser, user):
    key, raw = ApiKey.issue(user, "old")
    response = browser.post(f"{PAGE}{key.pk}/revoke/", follow=True)
    assert response.status_code == 200
    assert "was revoked" in response.content.decode()
    key.refresh_from_db()
    assert key.revoked_at is not None
    refused = Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    page = browser.get(PAGE).content.decode()
    assert "revoked" in page
    assert browser.get(f"{PAGE}{key.pk}/revoke/").status_code == 405


def test_another_users_key_cannot_be_revoked_and_is_not_listed(browser, other_user):
    theirs, raw = ApiKey.issue(other_user, "bobs key")
    assert browser.post(f"{PAGE}{theirs.pk}/revoke/").status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
    assert "bobs key" not in browser.get(PAGE).content.decode()
    assert Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 200


def test_the_number_of_active_keys_is_bounded_with_a_clear_message(browser, user):
    for i in range(MAX_ACTIVE_KEYS):
        ApiKey.issue(user, f"k{i}")
    response = browser.post(PAGE, {"name": "one too many"})
    assert response.status_code == 400
    assert "revoke one" in response.content.decode()
    assert ApiKey.objects.filter(user=user).count() == MAX_ACTIVE_KEYS
    ApiKey.objects.filter(user=user).first().revoke()
    assert browser.post(PAGE, {"name": "now it fits"}).status_code == 201


def test_admins_see_every_key_and_revoke_them(admin_user, user, other_user):
    mine, _ = ApiKey.issue(user, "alice key")
    theirs, raw = ApiKey.issue(other_user, "bob key")
    admin = Client()
    admin.force_login(admin_user)
    listing = admin.get("/admin/accounts/apikey/").content.decode()
    assert "alice key" in listing and "bob key" in listing
    assert raw not in listing and theirs.key_hash not in listing
    response = admin.post(
        "/admin/accounts/apikey/",
        {"action": "revoke", "_selected_action": [theirs.pk]},
        follow=True,
    )
    assert response.status_code == 200
    theirs.refresh_from_db()
    mine.refresh_from_db()
    assert theirs.revoked_at is not None and mine.revoked_at is None
    assert Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 401


def test_a_user_who_is_not_staff_cannot_reach_the_keys_admin(browser):
    assert browser.get("/admin/accounts/apikey/").status_code == 302


def test_the_old_admin_address_of_api_keys_redirects_to_the_new_one(admin_user):
    admin = Client()
    admin.force_login(admin_user)
    response = admin.get("/admin/breezeweb/apikey/?q=ci")
    assert response.status_code == 308
    assert response["Location"] == "/admin/accounts/apikey/?q=ci"
