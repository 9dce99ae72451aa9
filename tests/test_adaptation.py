"""`behavior_config.adaptation_mode`: an adaptive persona (the shipped entertainer) answers a
quick question quickly and a long message or a request for a story at length; a static one
(the shipped companion) always has its whole `max_tokens`."""

from __future__ import annotations

import pytest

from companion.personas import BehaviorConfig
from tests.conftest import fake_app, make_settings
from tests.fakes import FakeChatModel

QUICK = "What is two plus two?"
MEDIUM = "My granddaughter visits on Sunday and she loves puzzles, what should we do together?"
LONG = "I walked to the market this morning and the baker gave me bread, " * 2 + "what a day."
STORY = "Tell me a story."
SCRIPT = "word " * 400  # FakeChatModel stops at 8 characters per token allowed


def length_for(tokens: int) -> int:
    return len(SCRIPT[: tokens * 8].strip())


async def test_an_adaptive_persona_follows_the_users_length(tmp_path):
    llm = FakeChatModel(SCRIPT)
    app = fake_app(make_settings(tmp_path), llm=llm)
    await app.start()
    await app.conversation.switch_persona("entertainer")  # adaptive, max_tokens 90
    said = [QUICK, MEDIUM, LONG, STORY]
    replies = [await app.conversation.reply_text(text) for text in said]
    assert [len(r.text) for r in replies] == [length_for(n) for n in (24, 4 * 14, 90, 90)]
    sent = [prompt[-1]["content"] for prompt in llm.prompts]
    assert sent == [f"{QUICK}\n(Answer in one short sentence.)",
                    f"{MEDIUM}\n(Answer in two or three sentences.)", LONG, STORY]
    session = app.store.get_session(replies[0].session_id)
    assert [m.content for m in session.messages if m.role == "user"] == said
    # the history the next prompt carries holds the words as said, without the hint
    assert {"role": "user", "content": QUICK} in llm.prompts[-1]


async def test_a_static_persona_always_has_its_whole_budget(tmp_path):
    llm = FakeChatModel(SCRIPT)
    app = fake_app(make_settings(tmp_path), llm=llm)
    await app.start()
    assert app.conversation.active_persona.behavior_config.adaptation_mode == "static"
    reply = await app.conversation.reply_text(QUICK)
    assert len(reply.text) == length_for(80)  # companion: max_tokens 80
    assert llm.prompts[-1][-1]["content"] == QUICK


@pytest.mark.parametrize(("text", "tokens"), [
    ("Hi.", 24), ("one two three four five six seven", 28), ("word " * 20, 80), ("word " * 40, 90),
    ("Could you explain how tides work?", 90), ("Tell me about the moon.", 90)])
def test_the_adaptive_budget(text, tokens):
    assert BehaviorConfig(adaptation_mode="adaptive", max_tokens=90).reply_tokens(text) == tokens
    assert BehaviorConfig(max_tokens=90).reply_tokens(text) == 90
