"""A private PulseAudio with a null sink, so the real sounddevice path runs on a machine with no
sound card: what is played to the sink can be recorded from its monitor."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import until_blocking


@contextmanager
def private_pulseaudio(tmp: Path, *, rate: int = 16000) -> Iterator[dict[str, str]]:
    """Start PulseAudio in `tmp`, set the process environment so PortAudio finds it, and stop it
    afterwards. Yields the environment for subprocesses."""
    if shutil.which("pulseaudio") is None:
        raise RuntimeError("pulseaudio is not installed (scripts/setup.sh installs it)")
    env = {"HOME": str(tmp / "home"), "PULSE_RUNTIME_PATH": str(tmp / "run"),
           "XDG_RUNTIME_DIR": str(tmp / "xdg")}
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True, mode=0o700)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    full = {**os.environ}
    subprocess.run(
        ["pulseaudio", "--daemonize=yes", "--exit-idle-time=-1", "--disallow-exit", "-n",
         "--load=module-native-protocol-unix",
         f"--load=module-null-sink sink_name=vspeaker rate={rate} channels=1",
         "--load=module-always-sink"],
        check=True, env=full, capture_output=True, timeout=20,
    )
    try:
        until_blocking(lambda: subprocess.run(["pactl", "info"], env=full,
                                              capture_output=True).returncode == 0,
                       5, "pulseaudio answers", every_s=0.05)
        subprocess.run(["pactl", "set-default-sink", "vspeaker"], env=full, check=True)
        subprocess.run(["pactl", "set-default-source", "vspeaker.monitor"], env=full, check=True)
        _reset_portaudio()
        yield full
    finally:
        subprocess.run(["pulseaudio", "--kill"], env=full, capture_output=True, timeout=20)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reset_portaudio()


def _reset_portaudio() -> None:
    """PortAudio lists devices once; re-initialise it so it sees the new server."""
    import sounddevice as sd

    sd._terminate()
    sd._initialize()
