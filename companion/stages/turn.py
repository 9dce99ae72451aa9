"""Semantic end of turn: decide from what was said, not only from how long the silence is.

People pause inside sentences ("What is the capital of … Germany?") and finish crisply
("Stop."). A fixed silence window is too short for the first and too long for the second. At
each pause the pipeline has the words said so far (streaming transcription); the loaded
language model then says how likely its end-of-message token is right after them (the idea of
LiveKit's turn detector, with no extra model). A complete utterance ends after a short silence,
an incomplete one after a long one, and a local command ("stop", "louder") at once.

``TurnPolicy`` is pure and works in audio seconds, so it is tested without models or clocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from companion.intents import VOICE_CONFIDENCE, parse
from companion.settings import TurnSettings


@runtime_checkable
class EndOfTurnModel(Protocol):
    """A chat model that can estimate whether a user's message is finished."""

    async def end_of_turn_probability(self, messages: list, *, priority: int = 0) -> float:
        """P(the last user message, without its final punctuation, ends here), in [0, 1]."""
        ...


@dataclass(frozen=True)
class TurnDecision:
    """What the pipeline decided at a pause (it goes into the SPEECH_END event)."""

    reason: str  # "complete", "incomplete", "command", "silence" (fixed window), "max-length"
    probability: float | None  # the model's end-of-turn probability; None when not asked
    silence_needed_s: float  # silence (audio seconds) that ends the utterance given this decision

    def as_event(self) -> dict:
        prob = None if self.probability is None else round(self.probability, 4)
        return {"end_reason": self.reason, "end_probability": prob,
                "silence_needed_s": round(self.silence_needed_s, 3)}


class TurnPolicy:
    """How much silence ends the utterance, given what is known about the words so far."""

    def __init__(self, settings: TurnSettings, fixed_silence_s: float, *,
                 model_available: bool = True) -> None:
        self.settings = settings
        self.fixed_silence_s = fixed_silence_s  # vad.silence_end_s: used when semantic is off
        self.semantic = settings.semantic and model_available

    @property
    def longest_silence_s(self) -> float:
        """The silence after which the utterance ends whatever was said."""
        return self.settings.incomplete_silence_s if self.semantic else self.fixed_silence_s

    @property
    def probe_silence_s(self) -> float:
        """Silence after which the words so far are transcribed and judged."""
        return self.settings.probe_silence_s

    def decide(self, probability: float | None, *, command: bool = False) -> TurnDecision:
        if not self.semantic:
            return TurnDecision("silence", None, self.fixed_silence_s)
        if command:
            return TurnDecision("command", probability, self.settings.probe_silence_s)
        if probability is None:  # the model could not say: the safe, long window
            return TurnDecision("incomplete", None, self.settings.incomplete_silence_s)
        if probability >= self.settings.complete_threshold:
            return TurnDecision("complete", probability, self.settings.complete_silence_s)
        return TurnDecision("incomplete", probability, self.settings.incomplete_silence_s)


_SENTENCE_MARKS = re.compile(r"(?<!\d)[.?!…]+|[.?!…]+(?!\d)")  # not the point in 2.5
_TRAILING = re.compile(r"[\s,;:\-]+$")


def normalize_transcript(text: str) -> str:
    """What the model judges: the words without sentence marks. Whisper ends almost every piece
    with a full stop or a question mark, even "What is the capital of?", and keeps the one it
    put at a pause ("How many legs? Does an octopus have?"); whether the model would end the
    sentence here itself is the signal."""
    return _TRAILING.sub("", " ".join(_SENTENCE_MARKS.sub(" ", text).split()))


def is_instant_command(text: str) -> bool:
    """A local command that is complete as soon as it is said ("stop", "louder", "unmute")."""
    intent = parse(text)
    if not intent.parsed or intent.confidence < VOICE_CONFIDENCE or intent.requires_approval:
        return False
    return intent.command in ("stop", "unmute") or (
        intent.command == "volume" and "change" in intent.args)
