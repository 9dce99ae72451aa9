"""The plain-language command parser (no LLM): numbers in words, volume, stop, personas."""

from __future__ import annotations

import pytest

from companion.intents import describe_duration, normalize, parse, parse_duration, words_to_number
from companion.personas import PersonaLibrary
from companion.settings import PROJECT_ROOT


@pytest.fixture(scope="module")
def personas() -> PersonaLibrary:
    library = PersonaLibrary(PROJECT_ROOT / "personas")
    library.load()
    return library


@pytest.mark.parametrize(("words", "number"), [
    ("five", 5), ("twenty five", 25), ("twenty-five", None), ("a hundred and ten", 110),
    ("one hundred", 100), ("2.5", 2.5), ("one and a half", 1.5), ("a", 1), ("an", 1),
    ("ninety nine", 99), ("banana", None), ("", None),
])
def test_words_to_number(words, number):
    assert words_to_number(words) == number


@pytest.mark.parametrize(("text", "seconds"), [
    ("five minutes", 300), ("a minute", 60), ("an hour and a half", 5400),
    ("half an hour", 1800), ("1 hour 30 minutes", 5400), ("ninety seconds", 90),
    ("twenty five minutes", 1500), ("two hours and ten minutes", 7800), ("no time", None),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "command", "args"), [
    ("Set a timer for five minutes.", "timer", {"seconds": 300.0}),
    ("set a timer for 5 minutes", "timer", {"seconds": 300.0}),
    ("Hey, could you set a 10 minute timer please", "timer", {"seconds": 600.0}),
    ("set an egg timer for three minutes", "timer", {"seconds": 180.0, "label": "egg"}),
    ("set a timer for ten minutes for the potatoes", "timer",
     {"seconds": 600.0, "label": "potatoes"}),
    ("remind me in twenty-five minutes", "timer", {"seconds": 1500.0}),
    ("set a timer for half an hour", "timer", {"seconds": 1800.0}),
    ("cancel the timer", "timer", {"action": "cancel"}),
    ("how much time is left on the timer", "timer", {"action": "list"}),
    ("be quieter", "volume", {"change": "down"}),
    ("A bit quieter please", "volume", {"change": "down"}),
    ("turn it down", "volume", {"change": "down"}),
    ("louder", "volume", {"change": "up"}),
    ("speak up", "volume", {"change": "up"}),
    ("I can't hear you", "volume", {"change": "up"}),
    ("set the volume to 40 percent", "volume", {"level": 40}),
    ("volume five", "volume", {"level": 50}),
    ("stop", "stop", {}),
    ("Stop talking!", "stop", {}),
    ("be quiet", "stop", {}),
    ("never mind", "stop", {}),
    ("what time is it?", "time", {}),
    ("What's the time", "time", {}),
    ("what day is it", "time", {"date": True}),
    ("mute", "mute", {}),
    ("stop listening", "mute", {}),
    ("unmute", "unmute", {}),
    ("what can you do", "help", {}),
    ("switch to the nurse", "persona", {"id": "medication_nurse"}),
    ("I want to talk to Nora", "persona", {"id": "medication_nurse"}),
    ("change to the entertainer", "persona", {"id": "entertainer"}),
])
def test_commands_are_recognised(personas, text, command, args):
    intent = parse(text, personas)
    assert (intent.command, intent.args) == (command, args)
    assert intent.confidence >= 0.75  # confident enough for the voice pipeline


@pytest.mark.parametrize("text", [
    "how do I stop snoring", "what is the capital of France", "tell me a story about a timer",
    "I like it louder in the evening", "", "   ", "the volume of a sphere",
])
def test_questions_are_left_to_the_llm(personas, text):
    intent = parse(text, personas)
    assert intent.command is None or intent.confidence < 0.75


def test_uncertain_or_risky_matches_need_approval(personas):
    assert parse("mute", personas).requires_approval  # muted, it cannot hear "unmute"
    unknown = parse("switch to the pirate", personas)
    assert unknown.command == "persona" and unknown.args == {"name": "the pirate"}
    assert unknown.confidence < 0.5 and unknown.requires_approval
    vague = parse("set a timer", personas)
    assert vague.command == "timer" and vague.requires_approval
    say = parse("say Good Morning", personas)
    assert say.args == {"text": "Good Morning"} and say.requires_approval


def test_normalize_and_describe():
    assert normalize("Hey, could you please STOP now!") == "stop"
    assert describe_duration(300) == "5 minutes"
    assert describe_duration(3675) == "1 hour 1 minute 15 seconds"
