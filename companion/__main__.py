"""Command line: argv → settings → logging → one asyncio.run(...).

    companion run                         the daemon
    companion chat "text" [--speak x.wav] one text turn through the real LLM
    companion say "text" [--out x.wav]    TTS only (speaker, or a WAV file)
    companion check                       loads every model, looks at devices and settings
    companion simulate --input in.wav --output out.wav [--events ev.jsonl] [--fast]
    companion models list|pull NAME|verify [NAME]|use NAME
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog

from companion import check as check_mod
from companion.app import Features, build_app, install_signal_handlers, tune_process
from companion.devices.audio import (
    AudioFileError,
    AudioUnavailableError,
    WavFileSink,
    WavFileSource,
    write_wav,
)
from companion.log import configure_logging
from companion.models import ModelMissingError
from companion.models_cli import add_parser as add_models_parser
from companion.models_cli import cmd_models
from companion.settings import CompanionSettings, describe_validation_error, load_settings
from companion.store import StorageError
from companion.version import VERSION

log = structlog.get_logger("companion")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="companion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--debug", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"companion {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the daemon")
    chat = sub.add_parser("chat", help="one text turn through the LLM")
    chat.add_argument("text")
    chat.add_argument("--speak", type=Path, metavar="WAV", help="also synthesize the reply")
    chat.add_argument("--conversation", help="continue this conversation id")
    say = sub.add_parser("say", help="speak text (TTS only)")
    say.add_argument("text")
    say.add_argument("--out", type=Path, metavar="WAV", help="write a WAV instead of playing")
    say.add_argument("--persona", help="speak in this persona's voice")
    check = sub.add_parser("check", help="verify models, devices and settings")
    check.add_argument("--skip", default="", help="comma list of checks to skip: audio,gpio")
    sim = sub.add_parser("simulate", help="run the voice loop on a WAV file")
    sim.add_argument("--input", type=Path, required=True, help="microphone WAV")
    sim.add_argument("--output", type=Path, required=True, help="speaker WAV to write")
    sim.add_argument("--events", type=Path, help="write events as JSON lines here")
    sim.add_argument("--fast", action="store_true", help="as fast as possible, not real time")
    sim.add_argument("--no-wake", action="store_true",
                     help="start listening at once, as if the button was pressed")
    sim.add_argument("--data-dir", type=Path, help="keep the store here (default: temporary)")
    room = sim.add_argument_group(
        "simulated room", "any of these puts the microphone in a room that also hears the "
        "device's own speaker (companion/room.py)")
    room.add_argument("--room-echo-db", metavar="DB",
                      help="echo level relative to the user's speech at the mic (default +6)")
    room.add_argument("--room-delay-ms", metavar="MS", help="speaker → mic delay (default 30)")
    room.add_argument("--room-rt60", metavar="S", help="reverberation time (default 0.3)")
    room.add_argument("--room-noise", metavar="KIND", help="white, pink, babble or a WAV path")
    room.add_argument("--room-snr-db", metavar="DB", help="speech over noise (default 10)")
    room.add_argument("--room-seed", metavar="N", help="the same room every time (default 0)")
    add_models_parser(sub)
    return parser.parse_args(argv)


ROOM_OPTIONS = {"echo_db": float, "delay_ms": float, "rt60": float, "noise": str,
                "snr_db": float, "seed": int}


def room_config(args: argparse.Namespace):
    """The RoomConfig the --room-* options ask for, None without any; RoomError when bad."""
    from companion.room import RoomConfig, RoomError

    given = {k: getattr(args, f"room_{k}") for k in ROOM_OPTIONS
             if getattr(args, f"room_{k}", None) is not None}
    if not given:
        return None
    values = {}
    for key, raw in given.items():
        try:
            values[key] = ROOM_OPTIONS[key](raw)
        except ValueError:
            flag = "--room-" + key.replace("_", "-")
            raise RoomError(f"{flag} {raw!r}: not a {ROOM_OPTIONS[key].__name__} number") from None
    return RoomConfig(**values)


def main(argv: list[str] | None = None) -> int:
    from companion.room import RoomError

    args = parse_args(argv)
    try:
        args.room = room_config(args) if args.command == "simulate" else None
    except RoomError as exc:
        print(f"companion: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        overrides = {"log_level": "debug"} if args.debug else {}
        settings = load_settings(args.config, **overrides)
    except FileNotFoundError as exc:
        print(f"companion: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # pydantic ValidationError or a TOML syntax error
        print(f"companion: invalid settings: {describe_validation_error(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    commands = {"run": cmd_run, "chat": cmd_chat, "say": cmd_say, "check": cmd_check,
                "simulate": cmd_simulate, "models": cmd_models}
    try:
        return asyncio.run(commands[args.command](settings, args))
    except KeyboardInterrupt:
        return EXIT_OK
    except (ModelMissingError, AudioFileError, AudioUnavailableError, StorageError) as exc:
        print(f"companion: {exc}", file=sys.stderr)
        return EXIT_FAILED


async def cmd_run(settings: CompanionSettings, args: argparse.Namespace | None = None,
                  **parts: Any) -> int:
    """The daemon. ``parts`` replace real components (build_app's keywords): only a test's
    daemon process passes any (tests/reliability/daemon.py)."""
    if settings.api.unprotected:
        print(f"companion: {settings.api.unprotected}; refusing to serve an open API",
              file=sys.stderr)
        return EXIT_CONFIG
    app = build_app(settings, **parts)
    task = asyncio.current_task()
    assert task is not None
    install_signal_handlers(app, task)
    log.info("companion starting", version=VERSION, device_id=settings.device_id,
             data_dir=str(settings.data_dir))
    try:
        await app.run()
    except asyncio.CancelledError:
        log.info("companion stopping")
    finally:
        await app.aclose()
    return EXIT_OK


async def cmd_chat(settings: CompanionSettings, args: argparse.Namespace) -> int:
    sink = WavFileSink(args.speak) if args.speak else None
    app = build_app(settings, sink=sink, features=Features(
        audio_devices=False, voice_loop=False, http=False, control=False, gpio=False))
    try:
        await app.start()
        kwargs = {"session_id": args.conversation} if args.conversation else {"new_session": True}
        reply = await app.conversation.reply_text(args.text, source="cli", **kwargs)
        print(reply.text)
        print(json.dumps({"conversation_id": reply.session_id, "persona_id": reply.persona_id,
                          "tokens": reply.stats.total_tokens,
                          "latency_ms": round(reply.latency_ms, 1)}), file=sys.stderr)
        if sink is not None:
            voice = app.conversation.active_persona.voice_config.params()
            await app.speech.say(reply.text, voice)
    finally:
        if sink is not None:
            sink.close()
        await app.aclose()
    return EXIT_OK


async def cmd_say(settings: CompanionSettings, args: argparse.Namespace) -> int:
    sink = WavFileSink(args.out) if args.out else None
    app = build_app(settings, sink=sink, features=Features(
        voice_loop=False, http=False, control=False, gpio=False, audio_devices=sink is None,
        llm=False))
    try:
        await app.start()
        persona = app.personas.get(args.persona or settings.personas.default)
        if persona is None:
            print(f"companion: unknown persona {args.persona!r}", file=sys.stderr)
            return EXIT_FAILED
        await app.speech.say(args.text, persona.voice_config.params())
    finally:
        if sink is not None:
            sink.close()
        await app.aclose()
    return EXIT_OK


async def cmd_check(settings: CompanionSettings, args: argparse.Namespace) -> int:
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    report = await check_mod.run_checks(settings, skip=skip)
    print(report.render())
    return EXIT_OK if report.ok else EXIT_FAILED


async def cmd_simulate(settings: CompanionSettings, args: argparse.Namespace) -> int:
    from companion.room import RoomError

    tune_process()  # as the daemon runs
    try:
        room = await asyncio.to_thread(_build_room, args.room, settings, args) if args.room else None
    except RoomError as exc:
        print(f"companion: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if room is not None:
        source, sink = room.source(), room.speaker
    else:
        source = WavFileSource(args.input, realtime=not args.fast, block_ms=settings.audio.block_ms)
        sink = WavFileSink(args.output, realtime=not args.fast)
    with tempfile.TemporaryDirectory(prefix="companion-sim-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        settings = settings.model_copy(update={"data_dir": data_dir})
        app = build_app(settings, source=source, sink=sink, features=Features(
            audio_devices=False, http=False, control=False, gpio=False, warm_personas=False))
        events_file = args.events.open("w") if args.events else None
        if events_file is not None:
            app.bus.add_callback(lambda e: events_file.write(json.dumps(e.as_dict()) + "\n"))
        try:
            await app.start()
            assert app.voice is not None
            if room is not None:
                voice = app.voice
                voice.hears_itself = True
                room.linger = lambda: voice.busy and not voice._listening
            await app.conversation.warm_personas()  # as the daemon does at start
            if args.no_wake:
                app.voice.start_turn(trigger="button")
            await app.voice.run(hold_while_answering=args.fast)
            await app.voice.wait_idle()
        finally:
            if room is not None:
                write_wav(args.output, room.speaker.output_pcm())
            else:
                sink.close()
            if events_file is not None:
                events_file.close()
            await app.aclose()
    turns = list(app.status.recent_turns)
    print(json.dumps({"turns": [t.as_dict() for t in turns], "output": str(args.output),
                      "output_audio_s": round(sink.played_s, 3)}, indent=2))
    return EXIT_OK


def _build_room(config, settings: CompanionSettings, args: argparse.Namespace):
    """The room around the input WAV (in a thread: babble noise is synthesized)."""
    from companion.devices.audio import read_wav_16k_mono
    from companion.room import Room

    speak = None
    if config.noise == "babble":
        speak = piper_speaker(settings)
    return Room(config, read_wav_16k_mono(args.input), block_ms=settings.audio.block_ms,
                realtime=not args.fast, speak=speak)


def piper_speaker(settings: CompanionSettings):
    """text, speed → 16 kHz float samples in the project's piper voice (babble noise)."""
    import numpy as np

    from companion.devices.audio import PIPELINE_RATE, resample
    from companion.models import ModelRegistry
    from companion.stages.tts import PiperSynthesizer, VoiceParams

    synth = PiperSynthesizer(settings.tts, ModelRegistry(settings.models_dir))

    def speak(text: str, speed: float):
        clip = synth._run(text, VoiceParams(length_scale=speed))
        pcm = resample(clip.pcm, clip.sample_rate, PIPELINE_RATE)
        return np.frombuffer(pcm, np.int16).astype(np.float64)

    return speak


if __name__ == "__main__":
    sys.exit(main())
