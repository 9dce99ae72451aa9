"""Persona files, settings files and environment values as an attacker or a slip of the keyboard
writes them. Each ends in a persona or a PersonaFileError naming file and field, in settings or
one line naming the problem; nothing else (no TypeError, no RecursionError, no hang)."""

from __future__ import annotations

import json
import os
import time
import tomllib

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic_settings import SettingsError

from companion.credentials import CredentialError
from companion.personas import Persona, PersonaFileError, PersonaLibrary, load_persona_file
from companion.settings import PROJECT_ROOT, describe_validation_error, load_settings

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SETTINGS_ERRORS = (ValidationError, tomllib.TOMLDecodeError, CredentialError, UnicodeDecodeError,
                   SettingsError)

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) \
    | st.text(max_size=40)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=3), max_leaves=10)


def _fields(model) -> list[str]:
    return sorted(model.model_fields)


@st.composite
def persona_documents(draw) -> dict:
    """Mostly the right keys (so validation goes deep) with arbitrary values."""
    doc = {"id": "p", "name": draw(st.text(max_size=70)), "system_prompt": draw(st.text(max_size=50))}
    for key in draw(st.lists(st.sampled_from(_fields(Persona)), max_size=5, unique=True)):
        doc[key] = draw(values)
    for section in ("voice_config", "behavior_config", "character"):
        if draw(st.booleans()):
            model = Persona.model_fields[section].annotation
            doc[section] = {k: draw(values) for k in
                            draw(st.lists(st.sampled_from(_fields(model)), max_size=4, unique=True))}
    return doc


@FAST
@given(persona_documents(), st.sampled_from(["toml", "yaml"]))
def test_persona_files_load_or_name_the_problem(tmp_path, doc, kind):
    path = tmp_path / f"p.{kind}"
    if kind == "yaml":
        path.write_text(yaml.safe_dump(doc))
    else:
        path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in doc.items()
                                  if not isinstance(v, dict | list) and v is not None))
    try:
        persona = load_persona_file(path)
    except PersonaFileError as exc:
        assert exc.errors and all(e.file == path.name and e.field and e.message
                                  for e in exc.errors)
        return
    assert persona.id == "p"


@FAST
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
       st.sampled_from(["toml", "yaml"]))
def test_persona_files_of_garbage_are_refused(tmp_path, text, kind):
    path = tmp_path / f"p.{kind}"
    path.write_text(text, encoding="utf-8")
    try:
        load_persona_file(path)
    except PersonaFileError as exc:
        assert str(exc)


def test_a_yaml_bomb_is_refused_quickly(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
    path = tmp_path / "p.yaml"
    path.write_text("\n".join(levels) + '\nid: p\nname: P\nsystem_prompt: "x"\n'
                    "tags: *i\n")
    started = time.monotonic()
    with pytest.raises(PersonaFileError):
        load_persona_file(path)
    assert time.monotonic() - started < 5  # 10^9 strings if expanded


def test_a_bad_file_never_replaces_a_good_persona(tmp_path):
    good = (PROJECT_ROOT / "personas" / "companion.toml").read_text()
    (tmp_path / "companion.toml").write_text(good)
    library = PersonaLibrary(tmp_path)
    assert library.load() == [] and library.get("companion") is not None
    before = library.get("companion")
    (tmp_path / "companion.toml").write_text(good.replace("system_prompt", "system_prompt = 7\n#"))
    (tmp_path / "new.yaml").write_text("id: new\nname: [unclosed\n")
    errors = library.load()
    assert {e.file for e in errors} == {"companion.toml", "new.yaml"}
    assert library.get("companion") is before and "new" not in library


# --- settings files and environment values ----------------------------------------------------------

SETTING_KEYS = ["device_id", "data_dir", "log_level", "api.port", "api.host", "api.keys",
                "control_plane.url", "control_plane.token", "control_plane.ca_file",
                "wake.thresholds", "wake.models", "llm.temperature", "audio.block_ms",
                "personas.dir", "credentials_dir", "pipeline.turn_timeout_s", "vad.aggressiveness"]


def _settings_fail_cleanly(load) -> None:
    try:
        load()
    except SETTINGS_ERRORS as exc:
        line = describe_validation_error(exc)
        assert line and "\n" not in line
        assert "Traceback" not in line


@FAST
@given(st.dictionaries(st.sampled_from(SETTING_KEYS), values, max_size=4))
@example({"credentials_dir": True})  # was a TypeError from Path(True) before validation
def test_settings_files_load_or_fail_in_one_line(tmp_path, monkeypatch, doc):
    monkeypatch.chdir(tmp_path)
    tables: dict[str, dict] = {}
    lines = []
    for key, value in doc.items():
        section, _, name = key.rpartition(".")
        if section:
            tables.setdefault(section, {})[name] = value
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    for section, items in tables.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in items.items())
    config = tmp_path / "c.toml"
    config.write_text("\n".join(lines))  # JSON values are often not TOML: that is a case too
    _settings_fail_cleanly(lambda: load_settings(config))


@FAST
@given(st.text(max_size=300))
def test_settings_files_of_garbage_fail_in_one_line(tmp_path, text):
    config = tmp_path / "g.toml"
    config.write_text(text, encoding="utf-8")
    _settings_fail_cleanly(lambda: load_settings(config))


@FAST
@given(st.dictionaries(st.sampled_from(SETTING_KEYS),
                       st.text(max_size=40).filter(lambda v: "\x00" not in v), max_size=3))
def test_environment_values_load_or_fail_in_one_line(doc):
    env = {"COMPANION_" + k.upper().replace(".", "__"): v for k, v in doc.items()}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _settings_fail_cleanly(load_settings)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
