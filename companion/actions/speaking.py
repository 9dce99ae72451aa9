"""Saying and playing things outside a voice turn, politely or not, by priority.

Priority (the control plane's, also used by the other adapters): 0 waits until the device is
quiet, 1 cuts in after the current sentence, 2 and more at once.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from companion.actions.core import ActionError
from companion.events import Event, EventType
from companion.stages.tts import AudioClip, VoiceParams

if TYPE_CHECKING:
    from companion.app import App
    from companion.personas import Persona

PRIORITY_AFTER_SENTENCE = 1
PRIORITY_NOW = 2


def voice_of(app: App, persona: Persona | None = None) -> VoiceParams:
    return (persona or app.conversation.active_persona).voice_config.params()


async def speak(app: App, text: str, priority: int = 0, *, persona: Persona | None = None):
    """Say ``text``; returns the synthesis stats. No speaker is an UNAVAILABLE error."""
    speech = app.speech
    if speech.sink is None:
        raise ActionError("UNAVAILABLE", "no audio output device: cannot speak")
    if priority >= PRIORITY_NOW:
        return await speech.say(text, voice_of(app, persona), interrupt=True)
    if priority >= PRIORITY_AFTER_SENTENCE and speech.speaking:
        await end_of_sentence(app)
        return await speech.say(text, voice_of(app, persona), interrupt=True)
    await wait_quiet(app, 300)  # polite: not queued on the speaker, so urgent ones go first
    return await speech.say(text, voice_of(app, persona))


async def play_clip(app: App, clip: AudioClip, priority: int = 0) -> None:
    """Play recorded audio through the same speaker, politely or not by priority."""
    speech = app.speech
    if speech.sink is None:
        raise ActionError("UNAVAILABLE", "no audio output device: cannot play audio")
    cut_in = priority >= PRIORITY_AFTER_SENTENCE and speech.speaking
    if cut_in and priority < PRIORITY_NOW:
        await end_of_sentence(app)
    if not cut_in:
        await wait_quiet(app, 120)
    await speech.play_clip(clip, interrupt=cut_in)


async def end_of_sentence(app: App, timeout_s: float = 15.0) -> None:
    """Wait until the sentence being played ends (or nothing is speaking any more)."""
    ended = asyncio.get_running_loop().create_future()

    def on_event(event: Event) -> None:
        if event.type is EventType.PLAYBACK_END and not ended.done():
            ended.set_result(None)

    remove = app.bus.add_callback(on_event)
    try:
        async with asyncio.timeout(timeout_s):
            while app.speech.speaking and not ended.done():
                await asyncio.wait([ended], timeout=0.05)
    except TimeoutError:
        pass
    finally:
        remove()


async def wait_quiet(app: App, timeout_s: float = 60.0) -> None:
    # SpeechOutput offers no "quiet" event; poll briefly (bounded)
    async with asyncio.timeout(timeout_s):
        while app.speech.speaking:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
