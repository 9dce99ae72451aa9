"""Settings: TOML file, COMPANION_* environment (nested with __), clear errors, exit code 2."""

import pytest
from pydantic import ValidationError

from companion.__main__ import main
from companion.settings import CompanionSettings, describe_validation_error, load_settings


def test_defaults_match_the_contract(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./companion.toml here
    s = load_settings()
    assert (s.api.host, s.api.port, s.api.rate_limit_per_minute) == ("127.0.0.1", 3000, 60)
    assert s.control_plane.url is None and not s.control_plane.enabled
    assert s.audio.input_device is None and s.personas.default == "companion"
    assert s.device_id


def test_toml_file_then_environment_wins(monkeypatch, tmp_path):
    config = tmp_path / "companion.toml"
    config.write_text('device_id = "kitchen"\n[api]\nport = 3100\nkeys = ["a"]\n'
                      '[control_plane]\nurl = "wss://cp:8080"\n')
    monkeypatch.setenv("COMPANION_API__PORT", "3200")
    monkeypatch.setenv("COMPANION_API__KEYS", '["k1", "k2"]')
    monkeypatch.setenv("COMPANION_AUDIO__OUTPUT_DEVICE", "USB Speaker")
    s = load_settings(config)
    assert s.device_id == "kitchen"
    assert s.api.port == 3200
    assert [k.get_secret_value() for k in s.api.keys] == ["k1", "k2"]
    assert s.control_plane.url == "wss://cp:8080"
    assert s.audio.output_device == "USB Speaker"


def test_companion_toml_in_the_working_directory_is_found(monkeypatch, tmp_path):
    (tmp_path / "companion.toml").write_text('device_id = "hall"\n')
    monkeypatch.chdir(tmp_path)
    assert load_settings().device_id == "hall"


def test_settings_are_frozen():
    s = CompanionSettings()
    with pytest.raises(ValidationError):
        s.api.port = 1  # type: ignore[misc]


def test_a_bad_value_names_the_field(monkeypatch):
    monkeypatch.setenv("COMPANION_LLM__TEMPERATURE", "5")
    with pytest.raises(ValidationError) as info:
        load_settings()
    assert describe_validation_error(info.value).startswith("llm.temperature: ")


@pytest.mark.parametrize("env, field", [
    ({"COMPANION_LLM__TEMPERATURE": "5"}, "llm.temperature"),
    ({"COMPANION_API__PORT": "http"}, "api.port"),
    ({"COMPANION_DEVICE_ID": "bad id!"}, "device_id"),
    ({"COMPANION_VAD__AGGRESSIVENESS": "7"}, "vad.aggressiveness"),
])
def test_invalid_settings_stop_start_up_with_exit_code_2(monkeypatch, capsys, env, field):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"invalid settings: {field}:" in err


def test_a_missing_config_file_is_exit_code_2(capsys, tmp_path):
    assert main(["--config", str(tmp_path / "nope.toml"), "check"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_a_config_file_with_an_unknown_key_is_rejected(capsys, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[api]\nprot = 3000\n")
    assert main(["--config", str(config), "check"]) == 2
    assert "api.prot" in capsys.readouterr().err


def test_an_environment_value_that_is_not_json_names_the_field_and_why(monkeypatch, capsys):
    monkeypatch.setenv("COMPANION_WAKE__MODELS", "hey_jarvis")  # a list must be JSON
    assert main(["check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '"wake"' in err and "Expecting value" in err
