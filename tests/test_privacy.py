"""What a person says stays in the store, which only the daemon's user can read: never in logs
above DEBUG, never in files another user can open."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from companion.log import configure_logging
from companion.settings import PROJECT_ROOT
from companion.store import Store
from tests.conftest import fake_app, make_settings
from tests.fakes import BLOCK, FakeChatModel, FakeMic, FakeTranscriber, speech_block, wake_block

SAID = "my zebra takes warfarin on tuesdays"
ANSWERED = "Your quokka marmalade is ready. Ask your pharmacist first."
PRIVATE_WORDS = ["zebra", "warfarin", "quokka", "marmalade", "pharmacist"]


@pytest.fixture
def log_at() -> Iterator:
    """Configure logging into a buffer at a level; put the test defaults back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    before = structlog.get_config()

    def configure(level_name: str) -> io.StringIO:
        buffer = io.StringIO()
        configure_logging(level_name, "json", stream=buffer)
        return buffer

    yield configure
    structlog.configure(**before)
    root.handlers[:], root.level = handlers, level


async def _one_voice_turn(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    mic = FakeMic([BLOCK] * 5 + [wake_block()] + [speech_block()] * 20 + [BLOCK] * 40)
    app = fake_app(settings, source=mic, stt=FakeTranscriber(SAID), llm=FakeChatModel(ANSWERED))
    await app.start()
    async with asyncio.timeout(5):
        await app.voice.run()
        await app.voice.wait_idle()
    assert [m.content for m in app.store.get_session(
        await app.conversation.active_session()).messages] == [SAID, ANSWERED]
    await app.aclose()


async def test_a_voice_turn_logged_at_info_holds_none_of_the_words(tmp_path, log_at):
    buffer = log_at("info")
    await _one_voice_turn(tmp_path / "info")
    logged = buffer.getvalue()
    assert '"transcript"' in logged  # the turn was logged, only without its words
    assert not [word for word in PRIVATE_WORDS if word in logged], logged


async def test_at_debug_the_words_are_there_for_whoever_debugs(tmp_path, log_at):
    buffer = log_at("debug")
    await _one_voice_turn(tmp_path / "debug")
    assert "zebra" in buffer.getvalue()


def test_conversation_fields_are_redacted_above_debug(log_at):
    buffer = log_at("info")
    log = structlog.get_logger("test")
    log.warning("could not speak", text="zebra crossing", reply=["quokka"], chars=14)
    log.debug("details", text="marmalade")
    line = buffer.getvalue()
    assert "zebra" not in line and "quokka" not in line and "marmalade" not in line
    assert "<redacted: 14 chars>" in line and '"chars": 14' in line


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)  # the default under systemd and most shells
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_store_is_private_whatever_the_umask(tmp_path, umask_022):
    db = tmp_path / "data" / "companion.db"
    store = Store(db)
    session = store.create_session("medication_nurse")
    store.record_turn(session.id, "t1", SAID, ANSWERED, persona_id="medication_nurse", source="voice")
    files = [db, db.with_name("companion.db-wal"), db.with_name("companion.db-shm")]
    assert all(f.exists() for f in files)
    assert _mode(db.parent) == 0o700
    assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
    store.close()


def test_an_existing_data_dir_and_database_are_tightened(tmp_path, umask_022):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    Store(data / "companion.db").close()  # an install from before this rule
    (data / "companion.db").chmod(0o644)
    data.chmod(0o755)
    Store(data / "companion.db").close()
    assert _mode(data) == 0o700 and _mode(data / "companion.db") == 0o600


def test_the_unit_keeps_the_state_directory_and_new_files_private():
    lines = (PROJECT_ROOT / "systemd" / "companion.service").read_text().splitlines()
    assert "UMask=0077" in lines and "StateDirectoryMode=0700" in lines
