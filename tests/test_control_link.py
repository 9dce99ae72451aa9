"""The control-plane link end to end: a real daemon (App with fake models) against the dev control
plane (aiohttp) on 127.0.0.1, with millisecond backoff. Every await is bounded."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

from companion.actions.clips import clip_to_wav_b64
from companion.control.client import Backoff
from companion.control.protocol import ProtocolError, parse_server_frame, server_frame
from companion.devices.gpio import LedIndicator, make_gpio
from companion.events import EventType
from companion.settings import ControlPlaneSettings, GpioSettings
from companion.stages.tts import AudioClip
from tests.conftest import until
from tests.control_helpers import FAST, control_plane, linked_device, url
from tests.fakes import BLOCK, FakeMic, FakeSpeaker, FakeTranscriber, speech_block, wake_block
from tests.http_helpers import file_server

# --- pure parts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "code"), [
    ("{not json", "malformed_json"),
    ("[1, 2]", "malformed_frame"),
    (json.dumps({"type": "ping"}), "invalid_frame"),
    (json.dumps({"id": "c1", "type": "dance"}), "unknown_type"),
    (json.dumps({"id": "c1", "type": "persona_switch", "payload": {}}), "invalid_payload"),
    (json.dumps({"id": "c1", "type": "led_control", "payload": {"color": "#zzzzzz"}}),
     "invalid_payload"),
    (json.dumps({"id": "c1", "type": "audio_response", "payload": {}}), "invalid_payload"),
    (json.dumps({"id": "c1", "type": "ping", "payload": {"x": "y" * 2000}}), "frame_too_large"),
])
def test_bad_frames_are_refused_with_a_named_problem(raw, code):
    with pytest.raises(ProtocolError) as info:
        parse_server_frame(raw, max_bytes=1024)
    assert info.value.code == code
    assert info.value.message


def test_missing_field_is_named():
    raw = json.dumps({"id": "c9", "type": "persona_switch", "payload": {"preserve_context": True}})
    with pytest.raises(ProtocolError) as info:
        parse_server_frame(raw, max_bytes=10_000)
    assert "payload.persona_id" in info.value.message
    assert info.value.ref_id == "c9"


def test_backoff_is_full_jitter_exponential_capped_and_spread_after_a_drop():
    settings = ControlPlaneSettings(url="wss://x", backoff_initial_s=1, backoff_max_s=8,
                                    reconnect_spread_s=5)
    backoff = Backoff(lambda: settings, rng=lambda: 1.0)  # the top of each window
    assert [backoff.next_delay() for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    backoff.reset(dropped=True)
    assert [backoff.next_delay() for _ in range(4)] == [5, 5, 5, 8]
    low = Backoff(lambda: settings, rng=lambda: 0.0)
    assert low.next_delay() == 0.0  # full jitter: anywhere from zero
    assert 150 <= Backoff(lambda: settings).fatal_delay() <= 300


# --- connection, hello, heartbeats -------------------------------------------------------------------


async def test_hello_heartbeats_and_clock_offset(tmp_path):
    async with control_plane() as plane, linked_device(tmp_path, url(plane)) as (app, _link):
        conn = await plane.wait_connected("dev-a")
        assert conn.hello["device_id"] == "dev-a"
        assert conn.hello["active_persona_id"] == "companion"
        assert "persona_switch" in conn.hello["capabilities"]
        assert conn.hello["last_acked_command_id"] is None
        await plane.wait_for(lambda: conn.last_heartbeat is not None)
        assert conn.last_heartbeat["pipeline_state"] == "idle"
        status = app.control.status
        await until(lambda: status.clock_offset_ms is not None)
        assert status.connected and status.receipts
        assert abs(status.clock_offset_ms) < 50  # same machine, same clock
        assert app.status.components["control_plane"]["healthy"]


async def test_wrong_token_is_fatal_and_backs_off_long(tmp_path):
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(0.01)

    async with control_plane() as plane, linked_device(
            tmp_path, url(plane), cp={"token": "wrong"}, link_kwargs={"sleep": record}) as (app, _):
        status = app.control.status
        await until(lambda: len(delays) >= 2)
        assert status.fatal and not status.connected
        assert "401" in status.last_error
        assert all(0.1 <= d <= 0.2 for d in delays)  # backoff_fatal_s=0.2, jittered 50-100%
        assert not plane.devices


async def test_unreachable_then_up_reconnects_with_backoff(tmp_path):
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(delay)

    async with control_plane() as plane:
        port = plane.port
    async with linked_device(tmp_path, f"ws://127.0.0.1:{port}",
                             link_kwargs={"sleep": record}) as (app, _link):
        status = app.control.status
        await until(lambda: status.retries >= 3)
        assert not status.connected and status.last_error
        async with control_plane(port=port) as plane:
            await plane.wait_connected("dev-a")
            await until(lambda: status.connected)
        assert all(d <= FAST["backoff_max_s"] for d in delays)


# --- every command type ----------------------------------------------------------------------------


async def test_persona_switch_speaks_in_the_new_voice_and_acks_switch_complete(tmp_path):
    async with control_plane() as plane, linked_device(tmp_path, url(plane)) as (app, _):
        await plane.wait_connected("dev-a")
        await app.conversation.reply_text("remember the milk")
        session = app.conversation.active_session_id
        cid = await plane.send("dev-a", "persona_switch", {
            "persona_id": "entertainer", "preserve_context": True,
            "transition_message": "Ta-da, the entertainer is here."})
        ack = await plane.wait_ack(cid)
        assert ack["ok"] and ack["switch_complete"]
        assert ack["new_persona_id"] == "entertainer" and ack["previous_persona_id"] == "companion"
        assert ack["session_id"] == session and ack["latency_ms"] < 300
        assert app.conversation.active_persona_id == "entertainer"
        voice = app.personas.get("entertainer").voice_config.params()
        await until(lambda: any("entertainer" in t for t, _ in app.tts.spoken))
        assert [v for t, v in app.tts.spoken if "entertainer" in t] == [voice]
        # drop the context this time
        cid = await plane.send("dev-a", "persona_switch", {"persona_id": "companion",
                                                            "preserve_context": False})
        ack = await plane.wait_ack(cid)
        assert ack["session_id"] != session
        cid = await plane.send("dev-a", "persona_switch", {"persona_id": "nobody"})
        ack = await plane.wait_ack(cid)
        assert not ack["ok"] and "nobody" in ack["error"]


async def test_audio_response_text_wav_and_url(tmp_path):
    clip = AudioClip(b"\x05\x00" * 1600, 16000)
    wav_b64 = clip_to_wav_b64(clip)
    async with file_server({"/chime.wav": base64.b64decode(wav_b64)}) as files, \
            control_plane() as plane, \
            linked_device(tmp_path, url(plane), cp={"audio_url_hosts": ["127.0.0.1"]}) as (app, _):
        await plane.wait_connected("dev-a")
        ack = await plane.wait_ack(await plane.send("dev-a", "audio_response",
                                                    {"text": "Lunch is ready."}))
        assert ack["ok"] and ack["spoken_s"] > 0
        assert ("Lunch is ready.", app.conversation.active_persona.voice_config.params()) \
            in app.tts.spoken
        ack = await plane.wait_ack(await plane.send("dev-a", "audio_response",
                                                    {"audio_b64": wav_b64}))
        assert ack["ok"] and ack["played_s"] == 0.1
        assert app.sink.played[-1].pcm == clip.pcm
        ack = await plane.wait_ack(await plane.send("dev-a", "audio_response", {
            "audio_url": f"{files}/chime.wav"}))
        assert ack["ok"] and app.sink.played[-1].pcm == clip.pcm
        ack = await plane.wait_ack(await plane.send("dev-a", "audio_response",
                                                    {"audio_b64": "bm90IGEgd2F2"}))
        assert not ack["ok"] and "WAV" in ack["error"]


async def test_announce_waits_but_an_urgent_broadcast_cuts_in(tmp_path):
    speaker = FakeSpeaker(realtime=True, speed=4.0)  # 0.1 s of audio per word / 4
    async with control_plane() as plane, linked_device(tmp_path, url(plane), sink=speaker) as (app, _):
        await plane.wait_connected("dev-a")
        voice = app.conversation.active_persona.voice_config.params()
        long_talk = asyncio.create_task(app.speech.say(
            "One two three four five six seven eight. " * 3 + "The end.", voice))
        await until(lambda: app.speech.speaking)
        polite = await plane.send("dev-a", "announce", {"event_type": "reminder",
                                                        "payload": {"text": "Polite notice."}})
        urgent = await plane.send("dev-a", "broadcast", {"event_type": "alarm",
                                                         "text": "Fire drill now."}, priority=2)
        ack = await plane.wait_ack(urgent)
        assert ack["ok"] and ack["event_type"] == "alarm"
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(long_talk, 1)  # the long talk was cut
        ack = await plane.wait_ack(polite, within_s=5)
        assert ack["ok"]
        texts = [t for t, _ in app.tts.spoken]
        assert texts.index("Fire drill now.") < texts.index("Polite notice.")
        assert "The end." not in texts


async def test_led_control_then_back_to_the_state_display(tmp_path):
    led_hw = make_gpio(GpioSettings(pin_factory="mock"))
    async with control_plane() as plane, linked_device(tmp_path, url(plane)) as (app, _):
        led = LedIndicator(led_hw, app.bus, lambda: app.conversation.active_persona.led_color)
        app.led = led
        state_look = led.last_look
        await plane.wait_connected("dev-a")
        ack = await plane.wait_ack(await plane.send("dev-a", "led_control", {
            "pattern": "solid", "color": "green", "duration_ms": 150}))
        assert ack["ok"] and ack["color"] == "#00FF00"
        assert led.last_look == ((0.0, 1.0, 0.0), "solid")
        await until(lambda: led.last_look == state_look)
        led.close()
    async with control_plane() as plane, linked_device(tmp_path / "b", url(plane)) as (app, _):
        ack = await plane.wait_ack(await plane.send("dev-a", "led_control", {"color": "red"}))
        assert not ack["ok"] and "no LED" in ack["error"]


async def test_two_devices_handoff_and_the_second_continues_the_conversation(tmp_path):
    async with control_plane() as plane, \
            linked_device(tmp_path, url(plane), "kitchen") as (a, _), \
            linked_device(tmp_path, url(plane), "bedroom") as (b, _):
        await plane.wait_connected("kitchen")
        await plane.wait_connected("bedroom")
        await a.conversation.switch_persona("medication_nurse")
        first = await a.conversation.reply_text("My name is Ada and I take aspirin at noon.")
        session = first.session_id
        out = await plane.handoff("kitchen", "bedroom", notify_user=True)
        out_ack = await plane.wait_ack(out)
        assert out_ack["ok"] and out_ack["session_id"] == session and out_ack["turns"] == 2
        assert a.conversation.active_session_id is None  # ended locally
        assert any("bedroom" in t for t, _ in a.tts.spoken)  # goodbye
        export = plane.messages("kitchen", "session_export")[-1]["payload"]
        assert export["to_device_id"] == "bedroom" and export["session"]["turns"]

        def handed_in():
            return [c for c in plane.commands("bedroom")
                    if c["type"] == "session_handoff_in" and c["ack"]]

        into = (await plane.wait_for(handed_in))[0]["ack"]
        assert into["ok"] and into["session_id"] == session and into["turns"] == 2
        assert b.conversation.active_session_id == session
        assert b.conversation.active_persona_id == "medication_nurse"
        await until(lambda: b.tts.spoken)  # the greeting
        reply = await b.conversation.reply_text("When do I take it?")
        assert reply.session_id == session
        prompt = b.llm.prompts[-1]
        assert any("aspirin at noon" in m["content"] for m in prompt)
        assert prompt[-1]["content"] == "When do I take it?"


async def test_group_trivia_asks_listens_and_reports(tmp_path):
    blocks = [BLOCK] * 30 + [speech_block()] * 20 + [BLOCK] * 60
    mic = FakeMic(blocks * 4, delay_s=0.005)
    async with control_plane() as plane, linked_device(
            tmp_path, url(plane), source=mic, stt=FakeTranscriber("it is paris"),
            settings_extra={"wake": {"enabled": False}}) as (app, _):
        await plane.wait_connected("dev-a")
        cid = await plane.send("dev-a", "group_activity", {
            "activity_type": "trivia", "persona_id": "entertainer",
            "config": {"question": "What is the capital of France?", "answer": "Paris",
                       "answer_timeout_s": 3}})
        ack = await plane.wait_ack(cid, within_s=8)
        assert ack["ok"] and ack["answer"] == "it is paris" and ack["correct"] is True
        spoken = [t for t, _ in app.tts.spoken]
        assert "What is the capital of France?" in spoken and "That's right!" in spoken
        await plane.wait_for(lambda: plane.messages("dev-a", "transcript"))
        # an LLM-made question
        app.llm.reply = "Which planet is the largest? Jupiter."
        ack = await plane.wait_ack(await plane.send("dev-a", "group_activity", {
            "activity_type": "trivia", "config": {"topic": "space", "answer_timeout_s": 3}}),
            within_s=8)
        assert ack["question"] == "Which planet is the largest?"
        assert ack["question_source"] == "llm"
        assert "space" in app.llm.prompts[-1][-1]["content"]


async def test_group_story_takes_a_turn_and_sync_playback(tmp_path):
    async with control_plane() as plane, linked_device(tmp_path, url(plane)) as (app, link):
        await plane.wait_connected("dev-a")
        app.llm.reply = "The cat found a map. It led to the sea."
        ack = await plane.wait_ack(await plane.send("dev-a", "group_activity", {
            "activity_type": "story", "config": {"story_so_far": "Once upon a time.",
                                                 "listen": True}}))
        assert ack["ok"] and ack["story_part"] == "The cat found a map. It led to the sea."
        assert ack["user_part"] is None and ack["no_answer_reason"] == "no microphone"
        assert "Once upon a time." in app.llm.prompts[-1][-1]["content"]
        await until(lambda: link.status.clock_offset_ms is not None)
        at = time.time() + 0.3
        ack = await plane.wait_ack(await plane.send("dev-a", "group_activity", {
            "activity_type": "sync_playback", "config": {"at": at, "text": "Together now."}}))
        assert ack["ok"] and abs(ack["started_server_time"] - at) < 0.05


async def test_sync_event_two_devices_act_within_tens_of_ms(tmp_path):
    async with control_plane() as plane, \
            linked_device(tmp_path, url(plane), "d1") as (_a, la), \
            linked_device(tmp_path, url(plane), "d2") as (_b, lb):
        await until(lambda: la.status.clock_offset_ms is not None
                    and lb.status.clock_offset_ms is not None)
        at = time.time() + 0.4
        ids = [await plane.send(d, "sync_event", {"at": at, "action": "say", "text": "Cheers!"})
               for d in ("d1", "d2")]
        acks = [await plane.wait_ack(cid) for cid in ids]
        starts = [a["started_server_time"] for a in acks]
        assert all(a["ok"] for a in acks)
        assert abs(starts[0] - starts[1]) < 0.03
        assert all(abs(s - at) < 0.05 for s in starts)


async def test_config_update_applies_runtime_settings_and_refuses_others(tmp_path):
    async with control_plane() as plane, linked_device(tmp_path, url(plane)) as (app, _):
        await plane.wait_connected("dev-a")
        ack = await plane.wait_ack(await plane.send("dev-a", "config_update", {"settings": {
            "control_plane": {"heartbeat_s": 0.5}, "audio.output_volume": 0.3}}))
        assert ack["ok"] and ack["applied"] == {"control_plane.heartbeat_s": 0.5,
                                                "audio.output_volume": 0.3}
        assert app.settings.control_plane.heartbeat_s == 0.5 and app.status.volume == 0.3
        ack = await plane.wait_ack(await plane.send("dev-a", "config_update", {"settings": {
            "device_id": "other", "pipeline.follow_up_window_s": -1, "nope.x": 1,
            "pipeline.local_commands": False}}))
        assert not ack["ok"]
        assert ack["applied"] == {"pipeline.local_commands": False}
        assert set(ack["refused"]) == {"device_id", "pipeline.follow_up_window_s", "nope.x"}
        assert "restart" in ack["refused"]["device_id"]
        assert app.settings.device_id == "dev-a"


async def test_ping_and_duplicate_commands_run_once_and_are_acked_twice(tmp_path):
    async with control_plane() as plane, linked_device(tmp_path, url(plane)) as (app, link):
        await plane.wait_connected("dev-a")
        ack = await plane.wait_ack(await plane.send("dev-a", "ping", {"server_time": 1.0}))
        assert ack["ok"] and ack["pong"]
        frame = json.dumps(server_frame("audio_response", {"text": "Only once."}, frame_id="dup-1"))
        await plane.send_raw("dev-a", frame)
        await plane.send_raw("dev-a", frame)

        def acks():
            return [a for a in plane.acks("dev-a") if a["command_id"] == "dup-1"]

        await plane.wait_for(lambda: len(acks()) == 2)
        await plane.send_raw("dev-a", frame)  # after it ran and was acked
        await plane.wait_for(lambda: len(acks()) == 3)
        assert link.executed.count("dup-1") == 1
        assert [t for t, _ in app.tts.spoken].count("Only once.") == 1
        first, *again = acks()
        assert all(a["duplicate"] and a["spoken_s"] == first["spoken_s"] for a in again)


async def test_malformed_frames_get_error_frames_and_the_link_stays_up(tmp_path):
    async with control_plane() as plane, linked_device(
            tmp_path, url(plane), cp={"max_frame_bytes": 2048}) as (app, link):
        await plane.wait_connected("dev-a")
        persona = app.conversation.active_persona_id
        cases = {"malformed_json": "{oops", "malformed_frame": "42",
                 "invalid_frame": json.dumps({"type": "ping", "payload": {}}),
                 "unknown_type": json.dumps({"id": "u1", "type": "teleport", "payload": {}}),
                 "invalid_payload": json.dumps({"id": "p1", "type": "persona_switch",
                                                "payload": {"preserve_context": False}}),
                 "frame_too_large": json.dumps({"id": "big", "type": "announce",
                                                "payload": {"text": "x" * 4000}})}
        for raw in cases.values():
            await plane.send_raw("dev-a", raw)
        errors = await plane.wait_for(lambda: len(plane.messages("dev-a", "error")) >= len(cases)
                                      and plane.messages("dev-a", "error"))
        codes = [e["payload"]["code"] for e in errors]
        assert codes == list(cases)
        by_code = {e["payload"]["code"]: e["payload"] for e in errors}
        assert "payload.persona_id" in by_code["invalid_payload"]["message"]
        assert by_code["unknown_type"]["ref_id"] == "u1"
        assert len(plane.connect_log) == 1 and link.status.connected
        assert app.conversation.active_persona_id == persona and not link.executed
        ack = await plane.wait_ack(await plane.send("dev-a", "ping"))
        assert ack["ok"]


async def test_turn_transcripts_replies_buttons_and_errors_go_up(tmp_path):
    mic = FakeMic([BLOCK] * 5 + [wake_block()] + [speech_block()] * 20 + [BLOCK] * 60,
                  delay_s=0.002)
    async with control_plane() as plane, linked_device(
            tmp_path, url(plane), source=mic,
            settings_extra={"pipeline": {"follow_up_window_s": 0}}) as (app, _):
        await plane.wait_connected("dev-a")
        await plane.wait_for(lambda: plane.messages("dev-a", "reply"), within_s=5)
        transcript = plane.messages("dev-a", "transcript")[0]["payload"]
        reply = plane.messages("dev-a", "reply")[0]["payload"]
        assert transcript["text"] == "what is the capital of france"
        assert reply["text"] == "Paris is the capital. It is lovely."
        assert transcript["turn_id"] == reply["turn_id"] and reply["session_id"]
        assert not plane.messages("dev-a", "audio_stream")  # only when send_audio is set
        app.bus.emit(EventType.BUTTON, button="talk", kind="double")
        app.bus.emit(EventType.TURN_ERROR, "turn_x", code="stt-failed", message="boom")
        press = (await plane.wait_for(lambda: plane.messages("dev-a", "button_press")))[0]
        assert press["payload"] == {"button": "talk", "kind": "double"}
        error = (await plane.wait_for(lambda: plane.messages("dev-a", "error")))[0]
        assert error["payload"]["code"] == "stt-failed" and error["payload"]["turn_id"] == "turn_x"


async def test_typed_turns_go_up_as_text_input_and_reply(tmp_path):
    """A chat over HTTP (or the CLI) is reported like a voice turn, once, not twice."""
    async with control_plane() as plane, linked_device(tmp_path, url(plane)) as (app, _):
        await plane.wait_connected("dev-a")
        reply = await app.conversation.reply_text("Hello there", source="http")
        await plane.wait_for(lambda: plane.messages("dev-a", "reply"), within_s=5)
        said = plane.messages("dev-a", "text_input")[0]["payload"]
        answered = plane.messages("dev-a", "reply")[0]["payload"]
        assert said["text"] == "Hello there" and said["source"] == "http"
        assert answered["text"] == reply.text and answered["turn_id"] == said["turn_id"]
        assert answered["session_id"] == reply.session_id
        assert len(plane.messages("dev-a", "reply")) == 1


async def test_utterances_go_up_as_audio_stream_when_configured(tmp_path):
    import base64

    mic = FakeMic([BLOCK] * 5 + [wake_block()] + [speech_block()] * 20 + [BLOCK] * 60,
                  delay_s=0.002)
    async with control_plane() as plane, linked_device(
            tmp_path, url(plane), source=mic,
            cp={"send_audio": True},
            settings_extra={"pipeline": {"follow_up_window_s": 0}}) as (_app, _):
        await plane.wait_connected("dev-a")
        frames = await plane.wait_for(lambda: plane.messages("dev-a", "audio_stream"), within_s=5)
        payload = frames[0]["payload"]
        pcm = base64.b64decode(payload["audio_b64"])
        assert payload["sample_rate"] == 16000 and payload["format"] == "pcm_s16le"
        assert speech_block() * 20 in pcm
        transcript = (await plane.wait_for(lambda: plane.messages("dev-a", "transcript")))[0]
        assert transcript["payload"]["turn_id"] == payload["turn_id"]


def test_a_deeply_nested_frame_is_refused_not_a_crash():
    raw = '{"id": "c1", "type": "announce", "payload": {"payload": ' + "[" * 100_000 \
        + "]" * 100_000 + "}}"
    with pytest.raises(ProtocolError) as info:
        parse_server_frame(raw, max_bytes=1 << 20)
    assert info.value.code == "malformed_json" and "nested" in info.value.message
