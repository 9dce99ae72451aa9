"""A real daemon (`companion run`: real models, real sounddevice) on a private PulseAudio: its
microphone is the monitor of a null sink called ``room`` (play a WAV there and it hears it), its
speaker the default ``vspeaker``."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.processes import Fleet


def start_pulse_daemon(fleet: Fleet, env: dict[str, str], name: str = "dev",
                       **settings: str) -> None:
    """Loads the ``room`` sink and starts the daemon (``settings``: extra COMPANION_* values)."""
    subprocess.run(["pactl", "load-module", "module-null-sink", "sink_name=room",
                    "rate=16000", "channels=1"], env=env, check=True, capture_output=True)
    fleet.start_daemon(name, plane=False, env={
        **env, "PULSE_SOURCE": "room.monitor", "PULSE_SINK": "vspeaker",
        "COMPANION_AUDIO__INPUT_DEVICE": "pulse", "COMPANION_AUDIO__OUTPUT_DEVICE": "pulse",
        "COMPANION_PIPELINE__FOLLOW_UP_WINDOW_S": "0", **settings})


def say(env: dict[str, str], clip: Path) -> None:
    """Play ``clip`` into the daemon's microphone."""
    subprocess.run(["paplay", "--device=room", str(clip)], env=env, check=True, timeout=60)
