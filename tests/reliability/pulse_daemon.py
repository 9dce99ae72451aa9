"""A real daemon (`companion run`: real models, real sounddevice) on a private PulseAudio: its
microphone is the monitor of a null sink called ``room`` (play a WAV there and it hears it), its
speaker the default ``vspeaker``."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.test_control_daemon import Fleet, free_port


def start_pulse_daemon(tmp: Path, env: dict[str, str], name: str = "dev",
                       **settings: str) -> Fleet:
    """Loads the ``room`` sink and spawns the daemon (``settings``: extra COMPANION_* values);
    the caller waits for it to be ready and calls ``fleet.stop_all()``."""
    subprocess.run(["pactl", "load-module", "module-null-sink", "sink_name=room",
                    "rate=16000", "channels=1"], env=env, check=True, capture_output=True)
    fleet = Fleet(tmp)
    port = fleet.api_ports.setdefault(name, free_port())
    fleet._spawn(name, ["-m", "companion", "run"], {
        **env, "PULSE_SOURCE": "room.monitor", "PULSE_SINK": "vspeaker",
        "COMPANION_DEVICE_ID": name, "COMPANION_DATA_DIR": str(tmp / name),
        "COMPANION_API__PORT": str(port), "COMPANION_GPIO__ENABLED": "false",
        "COMPANION_LOG_FORMAT": "json", "COMPANION_AUDIO__INPUT_DEVICE": "pulse",
        "COMPANION_AUDIO__OUTPUT_DEVICE": "pulse", "COMPANION_PIPELINE__FOLLOW_UP_WINDOW_S": "0",
        **settings})
    return fleet


def say(env: dict[str, str], clip: Path) -> None:
    """Play ``clip`` into the daemon's microphone."""
    subprocess.run(["paplay", "--device=room", str(clip)], env=env, check=True, timeout=60)
