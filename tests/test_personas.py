"""Persona files: the shipped ones load, broken ones are rejected by file and field, a running
daemon never swaps a good persona for a bad one, reload on request and on SIGHUP."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest

from companion.app import install_signal_handlers
from companion.models import ModelRegistry
from companion.personas import PersonaFileError, PersonaLibrary, load_persona_file
from companion.settings import PROJECT_ROOT
from tests.conftest import fake_app, make_settings, until

SHIPPED = PROJECT_ROOT / "personas"

GOOD = '''id = "{id}"
name = "Tess"
system_prompt = "You are Tess."
[voice_config]
voice = "en_US-joe-medium"
length_scale = 1.1
'''




def _voice_exists(name: str) -> bool:
    return name.startswith("en_US")


def _library(directory: Path) -> PersonaLibrary:
    return PersonaLibrary(directory, voice_exists=_voice_exists)


def test_shipped_personas_load_with_the_installed_voice(installed_models: ModelRegistry) -> None:
    library = PersonaLibrary(SHIPPED, voice_exists=lambda voice: installed_models.has(voice, "tts"))
    assert library.load() == []
    assert {"companion", "medication_nurse", "entertainer"} <= set(library.ids())
    voices = {p.voice_config.params() for p in library.all()}
    assert len(voices) == len(library.all()), "each persona has a voice setting of its own"
    wake_words = [w for p in library.all() for w in p.behavior_config.wake_words]
    assert len(wake_words) == len(set(wake_words))


BROKEN = [
    # (file name, content, field named in the error)
    ("syntax.toml", 'id = "syntax\nname = "x"\n', "(syntax)"),
    ("missing.toml", 'id = "missing"\nname = "M"\n', "system_prompt"),
    ("wrong_type.toml", GOOD.format(id="wrong_type") + '[behavior_config]\ntemperature = "hot"\n',
     "behavior_config.temperature"),
    ("out_of_range.toml", GOOD.format(id="out_of_range").replace("1.1", "9.0"),
     "voice_config.length_scale"),
    ("unknown_voice.toml", GOOD.format(id="unknown_voice").replace("en_US-joe-medium", "xx_XX-nobody"),
     "voice_config.voice"),
    ("Bad-Id.toml", GOOD.format(id="Bad-Id"), "id"),
    ("not_me.toml", GOOD.format(id="someone_else"), "id"),
    ("extra.toml", GOOD.format(id="extra").replace('name = "Tess"', 'name = "Tess"\ncolour = "red"'),
     "colour"),
    ("bad_led.toml", GOOD.format(id="bad_led").replace('name = "Tess"', 'name = "T"\nled_color = "red"'),
     "led_color"),
    ("bad_mode.toml", GOOD.format(id="bad_mode") + '[behavior_config]\nadaptation_mode = "wild"\n',
     "behavior_config.adaptation_mode"),
    ("yaml_syntax.yaml", "id: [unclosed\n", "(syntax)"),
    ("yaml_list.yaml", "- id\n- name\n", "(root)"),
    ("empty.toml", "", "system_prompt"),
]


@pytest.mark.parametrize(("file_name", "content", "field"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_file_is_rejected_naming_file_and_field(tmp_path: Path, file_name: str, content: str,
                                                       field: str) -> None:
    path = tmp_path / file_name
    path.write_text(content)
    with pytest.raises(PersonaFileError) as caught:
        load_persona_file(path, voice_exists=_voice_exists)
    assert any(e.file == file_name and e.field == field for e in caught.value.errors), caught.value
    assert file_name in str(caught.value) and field in str(caught.value)


def test_library_keeps_the_good_files_and_reports_the_bad(tmp_path: Path) -> None:
    for name in ("companion.toml", "medication_nurse.toml"):
        shutil.copy(SHIPPED / name, tmp_path / name)
    for file_name, content, _ in BROKEN:
        (tmp_path / file_name).write_text(content)
    library = _library(tmp_path)
    errors = library.load()
    assert library.ids() == ["companion", "medication_nurse"]
    assert {e.file for e in errors} == {b[0] for b in BROKEN}


def test_yaml_persona_loads(tmp_path: Path) -> None:
    (tmp_path / "yam.yaml").write_text(
        "id: yam\nname: Yam\nsystem_prompt: You are Yam.\nbehavior_config:\n  temperature: 0.3\n")
    library = _library(tmp_path)
    assert library.load() == []
    persona = library.get("yam")
    assert persona is not None and persona.behavior_config.temperature == 0.3


def test_reload_never_swaps_a_good_persona_for_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "tess.toml"
    path.write_text(GOOD.format(id="tess"))
    library = _library(tmp_path)
    assert library.load() == []
    good = library.get("tess")
    path.write_text(GOOD.format(id="tess").replace("1.1", '"fast"'))  # now broken
    errors = library.load()
    assert [(e.file, e.field) for e in errors] == [("tess.toml", "voice_config.length_scale")]
    assert library.get("tess") is good
    path.write_text(GOOD.format(id="tess").replace("You are Tess.", "You are Tess, v2."))
    assert library.load() == []
    persona = library.get("tess")
    assert persona is not None and persona.system_prompt == "You are Tess, v2."
    path.unlink()  # removing a file removes the persona
    library.load()
    assert "tess" not in library


def test_names_and_wake_words() -> None:
    library = _library(SHIPPED)
    library.load()
    for spoken, expected in [("the nurse", "medication_nurse"), ("Nora", "medication_nurse"),
                             ("medication nurse", "medication_nurse"), ("the entertainer", "entertainer"),
                             ("Max", "entertainer"), ("sunny", "companion"), ("my companion", "companion")]:
        found = library.find_by_name(spoken)
        assert found is not None and found.id == expected, spoken
    assert library.find_by_name("the plumber") is None
    assert library.find_by_name("the") is None
    nurse = library.for_wake_word("hey_mycroft")
    assert nurse is not None and nurse.id == "medication_nurse"


async def test_daemon_starts_with_the_good_personas_and_reloads_on_request(tmp_path: Path) -> None:
    lib = tmp_path / "personas"
    lib.mkdir()
    for name in ("companion.toml", "medication_nurse.toml"):
        shutil.copy(SHIPPED / name, lib / name)
    (lib / "broken.toml").write_text('id = "broken"\n')
    settings = make_settings(tmp_path, personas={"dir": lib, "default": "companion"})
    app = fake_app(settings)
    async with asyncio.timeout(5):
        await app.start()
    assert app.personas.ids() == ["companion", "medication_nurse"]
    assert app.personas.errors and app.personas.errors[0].file == "broken.toml"

    (lib / "entertainer.toml").write_text((SHIPPED / "entertainer.toml").read_text())
    (lib / "medication_nurse.toml").write_text("id = ")  # broken while running
    errors = await asyncio.to_thread(app.reload_personas)  # as POST /v1/personas/reload does
    assert any("medication_nurse.toml" in e for e in errors)
    await until(lambda: app.conversation.prefix_ready("entertainer"))  # warmed in the background
    assert app.personas.ids() == ["companion", "entertainer", "medication_nurse"]
    async with asyncio.timeout(5):
        result = await app.conversation.switch_persona("medication_nurse")
    assert result.new_persona_id == "medication_nurse"
    app.store.close()


async def test_sighup_reloads_personas(tmp_path: Path) -> None:
    lib = tmp_path / "personas"
    shutil.copytree(SHIPPED, lib)
    settings = make_settings(tmp_path, personas={"dir": lib, "default": "companion"})
    app = fake_app(settings)
    async with asyncio.timeout(5):
        await app.start()
    (lib / "tess.toml").write_text(GOOD.format(id="tess"))
    loop = asyncio.get_running_loop()
    idle = asyncio.create_task(asyncio.sleep(60))
    install_signal_handlers(app, idle)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: "tess" in app.personas)
        await until(lambda: app.conversation.prefix_ready("tess"))  # warmed in the background
    finally:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        idle.cancel()
        await asyncio.wait([idle])
        app.store.close()


def test_examples_are_part_of_the_cached_persona_prompt(tmp_path):
    from companion.conversation import ConversationManager
    from companion.events import EventBus
    from companion.personas import PersonaLibrary
    from companion.settings import PROJECT_ROOT, LlmSettings
    from companion.store import Store
    from tests.fakes import FakeChatModel

    library = PersonaLibrary(PROJECT_ROOT / "personas")
    library.load()
    manager = ConversationManager(llm=FakeChatModel(), store=Store(tmp_path / "s.db"),
                                  personas=library, settings=LlmSettings(), bus=EventBus(),
                                  default_persona="companion")
    messages = manager.persona_messages(library.get("companion"))
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[2]["content"] == "The capital of Italy is Rome."


@pytest.mark.parametrize("voice", ["/etc/passwd.onnx", "../models/x", "voices/en.onnx",
                                   "evil.onnx", "~/v.onnx", ""])
def test_a_persona_voice_is_a_name_never_a_path(tmp_path, voice):
    path = tmp_path / "p.toml"
    path.write_text(f'id = "p"\nname = "P"\nsystem_prompt = "x"\n[voice_config]\nvoice = "{voice}"\n')
    with pytest.raises(PersonaFileError) as info:
        load_persona_file(path)
    assert "voice_config.voice" in str(info.value)
