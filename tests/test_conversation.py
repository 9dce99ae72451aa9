"""ConversationManager with a fake LLM: switching (atomic, with and without context, warm
prefixes), the prompt budget and the background summary, restart, forgetting, handoff."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from companion.conversation import (
    ACTIVE_SESSION_KEY,
    KEEP_AFTER_SUMMARY,
    NEXT_TURN_KEY,
    PersonaNotFoundError,
    SessionNotFoundError,
    announce_switch,
    fit_history,
    message_tokens,
)
from companion.events import EventType
from companion.stages.llm import Priority
from companion.store import Message, Store
from tests.conftest import fake_app, make_settings, until
from tests.fakes import FakeChatModel, FakeSynthesizer


async def started(settings, **parts):
    app = fake_app(settings, **parts)
    async with asyncio.timeout(5):
        await app.start()
    return app




async def ask(app, text: str, **kwargs):
    async with asyncio.timeout(5):
        return await app.conversation.reply_text(text, **kwargs)


def _contents(prompt) -> list[str]:
    return [m["content"] for m in prompt]


def _msg(i: int, role: str, text: str, tokens: int = 0) -> Message:
    return Message(i, "s", f"t{i // 2}", role, text, "companion", "voice", tokens, 0.0)


# --- fit_history -------------------------------------------------------------------------------


def test_fit_history_keeps_the_newest_whole_turns() -> None:
    msgs = [_msg(i, "user" if i % 2 == 0 else "assistant", "w " * 10) for i in range(10)]
    per = message_tokens(msgs[0], lambda t: len(t.split()))
    kept, overflow = fit_history(msgs, per * 5, lambda t: len(t.split()))
    # 5 fit, but the oldest of them would be an answer without its question: 4 kept
    assert [m.id for m in kept] == [6, 7, 8, 9]
    assert [m.id for m in overflow] == [0, 1, 2, 3, 4, 5]
    assert fit_history(msgs, 10_000, len) == (msgs, [])
    assert fit_history([], 100, len) == ([], [])


# --- switching ---------------------------------------------------------------------------------


async def test_switch_with_context_keeps_the_conversation(tmp_path: Path) -> None:
    llm = FakeChatModel("Noted.")
    app = await started(make_settings(tmp_path), llm=llm)
    first = await ask(app, "My name is Anna.")
    result = await app.conversation.switch_persona("medication_nurse", preserve_context=True,
                                                   transition_message="Hello, this is Nora.")
    assert (result.previous_persona_id, result.new_persona_id) == ("companion", "medication_nurse")
    assert result.session_id == first.session_id and result.preserved_context
    assert result.voice == app.personas.get("medication_nurse").voice_config.params()
    assert result.as_dict()["success"] is True
    second = await ask(app, "What is my name?")
    assert second.session_id == first.session_id and second.persona_id == "medication_nurse"
    prompt = llm.prompts[-1]
    assert prompt[0]["content"].startswith("You are Nora")
    assert "My name is Anna." in _contents(prompt) and "Noted." in _contents(prompt)
    nurse = app.personas.get("medication_nurse")
    assert nurse is not None
    assert app.conversation.active_persona.behavior_config == nurse.behavior_config
    stored = app.store.messages(first.session_id)
    assert [m.persona_id for m in stored] == ["companion", "companion", "medication_nurse",
                                             "medication_nurse"]
    app.store.close()


async def test_switch_without_context_starts_a_new_session(tmp_path: Path) -> None:
    llm = FakeChatModel("Noted.")
    app = await started(make_settings(tmp_path), llm=llm)
    first = await ask(app, "My name is Anna.")
    result = await app.conversation.switch_persona("entertainer", preserve_context=False)
    assert result.session_id != first.session_id
    second = await ask(app, "Tell me a joke.")
    assert second.session_id == result.session_id
    assert "My name is Anna." not in _contents(llm.prompts[-1])
    assert llm.prompts[-1][0]["content"].startswith("You are Max")
    assert app.store.get_session(first.session_id) is not None  # the old one is kept, not active
    app.store.close()


async def test_unknown_persona_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    app = await started(make_settings(tmp_path))
    with pytest.raises(PersonaNotFoundError):
        await app.conversation.switch_persona("plumber")
    assert app.conversation.active_persona_id == "companion"
    app.store.close()


async def test_a_switch_during_a_turn_applies_to_the_next_turn(tmp_path: Path) -> None:
    llm = FakeChatModel("one two three four five six seven eight", delay_s=0.02, chunk=3)
    app = await started(make_settings(tmp_path), llm=llm)
    turn = asyncio.create_task(ask(app, "Talk to me."))
    await until(lambda: len(llm.prompts) == 1)
    await app.conversation.switch_persona("medication_nurse")
    reply = await turn
    assert reply.persona_id == "companion"  # the turn finished as it began
    assert app.store.messages(reply.session_id)[-1].persona_id == "companion"
    nxt = await ask(app, "And now?")
    assert nxt.persona_id == "medication_nurse"
    assert llm.prompts[-1][0]["content"].startswith("You are Nora")
    app.store.close()


async def test_transition_message_is_spoken_in_the_new_voice(tmp_path: Path) -> None:
    tts = FakeSynthesizer()
    app = await started(make_settings(tmp_path), tts=tts)
    result = await app.conversation.switch_persona("medication_nurse",
                                                   transition_message="Hello, this is Nora.")
    async with asyncio.timeout(5):
        await announce_switch(app.speech, result)
    text, voice = tts.spoken[-1]
    assert text == "Hello, this is Nora."
    assert voice.length_scale == 1.2 and voice == result.voice
    assert voice != app.personas.get("companion").voice_config.params()
    app.store.close()


async def test_switch_through_the_event_bus_is_announced(tmp_path: Path) -> None:
    app = await started(make_settings(tmp_path))
    seen = []
    original = app.bus.emit

    def spy(kind, *args, **fields):
        seen.append((kind, fields))
        return original(kind, *args, **fields)

    app.bus.emit = spy  # type: ignore[method-assign]
    await app.conversation.switch_persona("entertainer")
    kinds = [k for k, _ in seen]
    assert EventType.PERSONA_SWITCHED in kinds
    fields = seen[kinds.index(EventType.PERSONA_SWITCHED)][1]
    assert fields["persona_id"] == "entertainer" and fields["previous"] == "companion"
    app.store.close()


# --- prefixes ----------------------------------------------------------------------------------


async def test_persona_prompts_are_evaluated_once_and_reused(tmp_path: Path) -> None:
    llm = FakeChatModel()
    app = await started(make_settings(tmp_path), llm=llm)
    async with asyncio.timeout(5):
        await app.conversation.warm_personas()
    assert {k.split(":")[0] for k in llm.prefixes} == set(app.personas.ids())
    warmed = dict(llm.prefixes)
    result = await app.conversation.switch_persona("entertainer")
    assert result.prefix_was_warm and llm.prefixes == warmed  # nothing evaluated again
    # the kept prefix is exactly how the turn's prompt begins
    await ask(app, "hello")
    key = next(k for k in llm.prefixes if k.startswith("entertainer:"))
    assert llm.prompts[-1][: len(llm.prefixes[key])] == llm.prefixes[key]
    app.store.close()


async def test_a_switch_does_not_wait_for_the_llm_and_warms_its_persona_first(
        tmp_path: Path) -> None:
    llm = FakeChatModel()
    app = await started(make_settings(tmp_path), llm=llm)
    llm.warm_release = asyncio.Event()  # the LLM is busy: no warm-up finishes for now
    warming = asyncio.create_task(app.conversation.warm_personas())
    await until(lambda: llm.warm_priorities)  # the background warm-up has started
    async with asyncio.timeout(5):  # returns while every warm-up is still held
        result = await app.conversation.switch_persona("entertainer")
    assert not result.prefix_was_warm and app.conversation.active_persona_id == "entertainer"
    assert not warming.done() and not llm.prefixes
    key = app.conversation._prefix_key(app.personas.get("entertainer"))
    await until(lambda: key in llm.warm_priorities)
    assert llm.warm_priorities[key] is Priority.INTERACTIVE  # ahead of the background warm-up
    assert set(llm.warm_priorities.values()) == {Priority.INTERACTIVE, Priority.BACKGROUND}
    llm.warm_release.set()
    async with asyncio.timeout(5):
        await warming
    await until(lambda: app.conversation.prefix_ready("entertainer"))
    await app.aclose()


async def test_cold_switch_evaluates_the_prompt_and_an_edited_persona_gets_a_new_state(
        tmp_path: Path) -> None:
    import shutil

    from companion.settings import PROJECT_ROOT

    lib = tmp_path / "personas"
    shutil.copytree(PROJECT_ROOT / "personas", lib)
    llm = FakeChatModel()
    app = await started(make_settings(tmp_path, personas={"dir": lib}), llm=llm)
    result = await app.conversation.switch_persona("entertainer")
    assert not result.prefix_was_warm
    path = lib / "entertainer.toml"
    path.write_text(path.read_text().replace("You are Max", "You are Maxine"))
    app.reload_personas()
    await until(lambda: app.conversation.prefix_ready("entertainer"))
    keys = [k for k in llm.prefixes if k.startswith("entertainer:")]
    assert len(keys) == 2  # the old prompt's state is never used for the new prompt
    await ask(app, "hi")
    assert llm.prompts[-1][0]["content"].startswith("You are Maxine")
    app.store.close()


async def test_the_next_turn_is_read_ahead_after_a_switch_that_keeps_history(tmp_path: Path) -> None:
    llm = FakeChatModel("Noted.")
    app = await started(make_settings(tmp_path), llm=llm)
    await ask(app, "My name is Anna.")
    await app.conversation.switch_persona("medication_nurse", preserve_context=True)
    await until(lambda: NEXT_TURN_KEY in llm.prefixes)
    ahead = llm.prefixes[NEXT_TURN_KEY]
    await ask(app, "What is my name?")
    nora = app.conversation.persona_messages(app.personas.get("medication_nurse"))
    assert llm.prompts[-1][: len(ahead)] == ahead
    assert ahead == [*nora, {"role": "user", "content": "My name is Anna."},
                     {"role": "assistant", "content": "Noted."}]
    await app.aclose()


# --- budget and summary --------------------------------------------------------------------------


async def test_prompt_is_persona_summary_and_recent_turns_within_budget(tmp_path: Path) -> None:
    llm = FakeChatModel("short answer here")  # 3 words
    settings = make_settings(tmp_path, llm={"history_token_budget": 100, "summary_enabled": False})
    app = await started(settings, llm=llm)
    for i in range(12):
        await ask(app, f"question number {i} about things")  # 5 words
    prompt = llm.prompts[-1]
    persona_part = len(app.conversation.persona_messages(app.conversation.active_persona))
    history = prompt[persona_part:-1]
    used = sum(len(m["content"].split()) + 4 for m in history)
    assert used <= 100 and history[0]["role"] == "user"
    assert history[-1]["content"] == "short answer here"
    assert prompt[-1]["content"] == "question number 11 about things"
    assert "question number 10 about things" in _contents(history)
    assert "question number 0 about things" not in _contents(prompt)
    app.store.close()


async def test_older_turns_are_folded_into_a_summary_in_the_background(tmp_path: Path) -> None:
    llm = FakeChatModel("short answer here")
    settings = make_settings(tmp_path, llm={"history_token_budget": 100})
    app = await started(settings, llm=llm)
    for i in range(12):
        await ask(app, f"question number {i} about things")
    async with asyncio.timeout(5):
        await app.conversation.wait_for_summaries()
    sid = app.conversation.active_session_id
    session = app.store.get_session(sid)
    assert session is not None and session.summary == "short answer here"
    summary_calls = [p for p in llm.prompts if p[0]["content"].startswith("Summarize")]
    assert {llm.priorities[llm.prompts.index(p)] for p in summary_calls} == {Priority.BACKGROUND}
    assert summary_calls and "user: question number 0 about things" in summary_calls[0][1]["content"]
    left = app.store.messages(sid, after_id=session.summarized_upto)
    assert sum(message_tokens(m, llm.count_tokens) for m in left) <= 100 * KEEP_AFTER_SUMMARY
    assert left[0].role == "user"
    ahead = llm.prefixes[NEXT_TURN_KEY]  # evaluated right after the summary
    await ask(app, "what did we talk about")
    prompt = llm.prompts[-1]
    persona_part = len(app.conversation.persona_messages(app.conversation.active_persona))
    assert prompt[persona_part] == {"role": "system",
                                    "content": "Earlier in this conversation: short answer here"}
    assert prompt[: len(ahead)] == ahead
    # the summary is folded on: the second summary call is given the first one
    for i in range(12):
        await ask(app, f"more words number {i} here")
    async with asyncio.timeout(5):
        await app.conversation.wait_for_summaries()
    later = [p for p in llm.prompts if p[0]["content"].startswith("Summarize")][-1]
    assert later[1]["content"].startswith("Summary so far: short answer here")
    app.store.close()


async def test_a_new_turn_goes_before_a_running_summary(tmp_path: Path) -> None:
    llm = FakeChatModel("a b c d e f g h i j k l", delay_s=0.01, chunk=2)
    settings = make_settings(tmp_path, llm={"history_token_budget": 64})
    app = await started(settings, llm=llm)
    for i in range(6):
        await ask(app, f"q {i}")
    sid = app.conversation.active_session_id
    summary = app.conversation._summaries.get(sid)
    assert summary is not None and not summary.done()
    await ask(app, "urgent question")
    assert summary.cancelled()
    async with asyncio.timeout(5):
        await app.conversation.wait_for_summaries()
    assert app.store.get_session(sid).summary  # it ran again afterwards
    app.store.close()


# --- sessions across restarts, forgetting, handoff -------------------------------------------------


async def test_the_conversation_survives_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    app = await started(settings, llm=FakeChatModel("I will remember."))
    await app.conversation.switch_persona("medication_nurse")
    first = await ask(app, "Remind me about the blue pill.")
    await app.aclose()

    llm = FakeChatModel("The blue pill.")
    again = await started(settings, llm=llm)
    assert again.conversation.active_persona_id == "medication_nurse"
    assert again.conversation.active_session_id == first.session_id
    reply = await ask(again, "What did I ask?")
    assert reply.session_id == first.session_id
    assert "Remind me about the blue pill." in _contents(llm.prompts[-1])
    assert len(again.store.messages(first.session_id)) == 4
    await again.aclose()


async def test_forgetting_the_active_session(tmp_path: Path) -> None:
    llm = FakeChatModel("ok")
    app = await started(make_settings(tmp_path), llm=llm)
    first = await ask(app, "my secret is 1234")
    assert await app.conversation.forget_session(first.session_id)
    assert app.store.get_session(first.session_id) is None
    assert app.store.get_value(ACTIVE_SESSION_KEY) is None
    second = await ask(app, "hello")
    assert second.session_id != first.session_id
    assert "my secret is 1234" not in _contents(llm.prompts[-1])
    # deleted behind the manager's back (e.g. retention): a new session starts too
    app.store.delete_session(second.session_id)
    third = await ask(app, "hello again")
    assert third.session_id not in (first.session_id, second.session_id)
    with pytest.raises(SessionNotFoundError):
        await ask(app, "x", session_id=first.session_id)
    app.store.close()


async def test_export_on_one_device_import_continues_on_another(tmp_path: Path) -> None:
    a = await started(make_settings(tmp_path / "a"), llm=FakeChatModel("Noted, Anna."))
    await a.conversation.switch_persona("medication_nurse")
    first = await ask(a, "I am Anna and I take my pills at eight.")
    doc = await a.store.run(a.store.export_session, first.session_id)

    llm = FakeChatModel("At eight.")
    b = await started(make_settings(tmp_path / "b"), llm=llm)
    session = await b.store.run(b.store.import_session, doc, origin="a")
    await b.conversation.adopt_session(session.id, session.persona_id)
    assert b.conversation.active_persona_id == "medication_nurse"
    reply = await ask(b, "When do I take my pills?")
    assert reply.session_id == first.session_id and reply.persona_id == "medication_nurse"
    assert "I am Anna and I take my pills at eight." in _contents(llm.prompts[-1])
    assert len(b.store.messages(session.id)) == 4
    a.store.close()
    b.store.close()


async def test_a_cancelled_turn_is_not_recorded(tmp_path: Path) -> None:
    llm = FakeChatModel("one two three four five six", delay_s=0.05, chunk=2)
    app = await started(make_settings(tmp_path), llm=llm)
    turn = asyncio.create_task(ask(app, "interrupt me"))
    await until(lambda: len(llm.prompts) == 1)
    turn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await turn
    assert llm.cancelled == 1
    sid = app.conversation.active_session_id
    assert app.store.messages(sid) == []
    app.store.close()


def test_store_of_a_fresh_manager_has_no_active_session(tmp_path: Path) -> None:
    store = Store(tmp_path / "x.db")
    assert store.get_value(ACTIVE_SESSION_KEY) is None
    store.close()


async def test_turns_stay_in_the_prompt_until_their_summary_replaces_them(tmp_path: Path) -> None:
    """Dropping turns as soon as they leave the budget would change the start of every prompt
    (llama.cpp would re-read the history each turn); they stay until the summary is written."""
    llm = FakeChatModel("short answer here")
    settings = make_settings(tmp_path, llm={"history_token_budget": 100})
    app = await started(settings, llm=llm)
    app.conversation.settings = app.conversation.settings.model_copy(update={"summary_enabled": False})
    for i in range(12):
        await ask(app, f"question number {i} about things")
    assert "question number 0 about things" not in _contents(llm.prompts[-1])  # no summary: budget
    app.conversation.settings = app.conversation.settings.model_copy(update={"summary_enabled": True})
    await app.conversation._pause_summary(app.conversation.active_session_id)
    llm.reply = "short answer here"
    before = len(llm.prompts)
    await ask(app, "question number 12 about things")
    turn_prompt = next(p for p in llm.prompts[before:] if not p[0]["content"].startswith("Summarize"))
    assert "question number 11 about things" in _contents(turn_prompt)
    used = sum(len(m["content"].split()) + 4 for m in turn_prompt[3:-1])
    assert used > 100  # more than the budget: the overflow waits for its summary in the prompt
    app.store.close()
