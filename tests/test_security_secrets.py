"""Secrets (api.keys, control_plane.token, llm.api_key): secret types that never print, loaded
from systemd credentials or a private file (issue 12, Security)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from pydantic import SecretStr, ValidationError
from structlog.testing import capture_logs

from companion.__main__ import main
from companion.credentials import CredentialError, read_secret_file
from companion.settings import CompanionSettings, describe_validation_error, load_settings
from tests.conftest import make_settings
from tests.control_helpers import TOKEN, control_plane, linked_device, url
from tests.http_helpers import start_api

KEY = "api-key-DO-NOT-PRINT"
LLM_KEY = "llm-key-DO-NOT-PRINT"
SECRETS = (KEY, TOKEN, LLM_KEY)


def _private(path, text: str, mode: int = 0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


def test_secrets_are_secret_types_that_never_print(tmp_path):
    s = make_settings(tmp_path, api={"keys": [KEY]}, control_plane={"token": TOKEN})
    assert isinstance(s.control_plane.token, SecretStr)
    assert all(isinstance(k, SecretStr) for k in s.api.keys)
    assert [k.get_secret_value() for k in s.api.keys] == [KEY]
    for text in (repr(s), str(s), s.model_dump_json(), json.dumps(s.model_dump(mode="json"))):
        assert not any(secret in text for secret in SECRETS)


def test_a_refused_setting_does_not_echo_the_secrets_beside_it(monkeypatch):
    monkeypatch.setenv("COMPANION_CONTROL_PLANE__TOKEN", TOKEN)
    monkeypatch.setenv("COMPANION_CONTROL_PLANE__URL", "ws://cp.example")  # refused: clear text
    with pytest.raises(ValidationError) as info:
        load_settings()
    assert TOKEN not in str(info.value) and TOKEN not in describe_validation_error(info.value)


def test_secrets_load_from_systemd_credentials(monkeypatch, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    _private(creds / "control_plane.token", TOKEN + "\n", 0o400)  # as systemd makes them
    _private(creds / "api.keys", f"# one key a line\n{KEY}\n\nsecond-key\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = load_settings(None, data_dir=tmp_path / "data")
    assert s.control_plane.token.get_secret_value() == TOKEN
    assert [k.get_secret_value() for k in s.api.keys] == [KEY, "second-key"]


def test_a_credentials_dir_setting_works_without_systemd(tmp_path):
    creds = tmp_path / "private"
    creds.mkdir()
    _private(creds / "control_plane.token", TOKEN)
    s = CompanionSettings(credentials_dir=creds, data_dir=tmp_path)
    assert s.control_plane.token.get_secret_value() == TOKEN


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660])
def test_a_file_others_can_read_is_refused_with_the_fix(tmp_path, mode):
    path = _private(tmp_path / "control_plane.token", TOKEN, mode)
    with pytest.raises(CredentialError) as info:
        read_secret_file(path)
    assert f"chmod 600 {path}" in str(info.value) and f"{mode:04o}" in str(info.value)
    assert TOKEN not in str(info.value)


def test_a_readable_credential_stops_start_up_with_one_line(monkeypatch, capsys, tmp_path):
    _private(tmp_path / "api.keys", KEY, 0o644)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert main(["check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chmod 600" in err and KEY not in err


def test_a_secret_set_twice_is_refused(monkeypatch, tmp_path):
    _private(tmp_path / "control_plane.token", TOKEN)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("COMPANION_CONTROL_PLANE__TOKEN", "another")
    with pytest.raises(ValidationError) as info:
        load_settings()
    assert "keep one" in describe_validation_error(info.value)


def test_a_missing_credentials_dir_is_an_error(tmp_path):
    with pytest.raises(ValidationError, match="not a directory"):
        CompanionSettings(credentials_dir=tmp_path / "nope")


async def test_no_secret_in_http_answers(aiohttp_client, tmp_path):
    client, app = await start_api(aiohttp_client, tmp_path, api={"keys": [KEY]},
                                  control_plane={"url": "ws://127.0.0.1:9", "token": TOKEN},
                                  llm={"api_key": LLM_KEY})
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        async with asyncio.timeout(10):
            for path in ("/v1/system/status", "/v1/state", "/ready/all", "/metrics",
                         "/metrics/prometheus", "/api-docs/openapi.json", "/v1/system/models"):
                response = await client.get(path, headers=auth)
                text = await response.text()
                assert response.status == 200, path
                assert not any(secret in text for secret in SECRETS), path
    finally:
        await app.aclose()


async def test_no_secret_in_logs_acks_or_frames(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        async with control_plane() as plane, linked_device(tmp_path, url(plane)) as (app, _):
            await plane.wait_connected("dev-a")
            ack = await plane.wait_ack(await plane.send("dev-a", "config_update", {
                "settings": {"control_plane": {"token": "NEW-SECRET-1"},
                             "api.keys": ["NEW-SECRET-2"]}}))
            assert not ack["ok"] and set(ack["refused"]) == {"control_plane.token", "api.keys"}
            sent = json.dumps([m for m in plane.messages("dev-a")])
    text = json.dumps(logs, default=str) + caplog.text + sent
    for secret in (*SECRETS, "NEW-SECRET-1", "NEW-SECRET-2"):
        assert secret not in text
    assert app.settings.control_plane.token.get_secret_value() == TOKEN  # nothing changed


def test_every_secret_setting_loads_from_a_credential_and_never_prints(monkeypatch, tmp_path):
    from companion.credentials import SECRET_SETTINGS

    values = {name: f"{name}-value-0123456789" for name in SECRET_SETTINGS}
    for name, value in values.items():
        _private(tmp_path / name, value)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    s = load_settings(None, data_dir=tmp_path / "data")
    for name, value in values.items():
        section, _, key = name.partition(".")
        got = getattr(getattr(s, section), key)
        got = got[0] if isinstance(got, list) else got
        assert isinstance(got, SecretStr) and got.get_secret_value() == value, name
    text = repr(s) + s.model_dump_json()
    assert not any(value in text for value in values.values())
