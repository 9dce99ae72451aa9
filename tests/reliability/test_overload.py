"""Overload on a real daemon (`companion run`: real models, real sounddevice on a private
PulseAudio): 50 chats at once and a burst of 1,000 `/v1/state` requests. Each request is
answered, queued or refused with a Retry-After (503 BUSY past `api.max_concurrent_chats`, 429
past the rate limit), none fails otherwise, the daemon stays up, and a voice turn started during
the burst is answered (voice goes first on the model thread: companion/stages/llm.py Priority)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from scripts.make_utterance_wav import make
from tests.fakes import FakeChatModel
from tests.http_helpers import start_api
from tests.processes import Fleet, http, until
from tests.pulse import private_pulseaudio
from tests.reliability.pulse_daemon import say, start_pulse_daemon


async def test_chats_past_the_cap_are_refused_at_once_with_retry_after(aiohttp_client, tmp_path):
    """The cap itself, in-process (fake model, one delta every 0.1 s): the extra chats hear 503
    BUSY at once, plain and streamed, and the admitted ones are answered."""
    client, _ = await start_api(aiohttp_client, tmp_path, api={"max_concurrent_chats": 2},
                                parts={"llm": FakeChatModel(delay_s=0.1)})

    async def chat(path: str) -> tuple[int, str | None, dict | None]:
        response = await client.post(path, json={"message": "hello"})
        body = await response.json() if response.status == 503 else None
        await response.read()
        return response.status, response.headers.get("Retry-After"), body

    async with asyncio.timeout(30):
        results = await asyncio.gather(*(chat("/v1/chat" if n % 2 else "/v1/chat/stream")
                                         for n in range(6)))
    assert sorted(status for status, _, _ in results) == [200, 200, 503, 503, 503, 503]
    for status, after, body in results:
        if status == 503:
            assert int(after) >= 1 and body["error"]["code"] == "BUSY"
            assert body["error"]["details"]["limit"] == 2
    assert (await client.post("/v1/chat", json={"message": "again"})).status == 200




async def _burst(base: str) -> tuple[list[tuple[int, str | None]], list[tuple[int, str | None]]]:
    timeout = aiohttp.ClientTimeout(total=330)  # the daemon's turn timeout is 300 s
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def one(method: str, path: str, body: dict | None = None) -> tuple[int, str | None]:
            async with session.request(method, base + path, json=body) as response:
                await response.read()
                return response.status, response.headers.get("Retry-After")

        chats = [asyncio.create_task(one("POST", "/v1/chat", {"message": f"Say a word, {n}."}))
                 for n in range(50)]
        await asyncio.sleep(0.2)
        states = await asyncio.gather(*(one("GET", "/v1/state") for _ in range(1000)))
        return list(await asyncio.gather(*chats)), list(states)


@pytest.mark.models
@pytest.mark.audio
def test_fifty_chats_and_a_thousand_states_queue_or_are_refused_and_voice_still_answers(
        tmp_path: Path, fleet: Fleet):
    question = make(tmp_path / "q.wav", wake="Hey Jarvis.", text="What is the capital of France?",
                    gap_s=0.6, tail_s=2.0)
    with private_pulseaudio(tmp_path) as env:
        start_pulse_daemon(fleet, env, COMPANION_PIPELINE__TURN_TIMEOUT_S="300",
                           COMPANION_LLM__MAX_TOKENS="24")
        try:
            base = fleet.api("dev")
            until(lambda: fleet.ready("dev"), 150, "the daemon ready")

            async def scenario():
                burst = asyncio.create_task(_burst(base))
                await asyncio.sleep(0.5)  # the chats are queued: now the user speaks
                await asyncio.to_thread(say, env, question)
                return await burst

            chats, states = asyncio.run(scenario())
            chat_status = Counter(status for status, _ in chats)
            state_status = Counter(status for status, _ in states)
            assert set(chat_status) <= {200, 503} and chat_status[503] > 0, chat_status
            assert chat_status[200] >= 4, chat_status  # the admitted ones were answered
            assert set(state_status) <= {200, 429} and state_status[429] > 0, state_status
            assert all(int(after) >= 1 for status, after in chats + states
                       if status in (429, 503)), "a refusal without Retry-After"

            def voice_answered() -> bool:
                stages = http("GET", f"{base}/metrics", timeout=10)[1]["pipeline"]
                return stages.get("end_of_speech_to_first_audio", {}).get("count", 0) >= 1

            until(voice_answered, 120, "the voice turn answered")
            assert fleet.procs["dev"].poll() is None  # still up
            assert http("GET", f"{base}/health", timeout=10)[0] == 200
        finally:
            fleet.stop_all()
