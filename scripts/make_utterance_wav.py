"""Make a microphone WAV for simulation and tests: a wake word, a pause, then a question.

    python scripts/make_utterance_wav.py out.wav --wake "Hey Jarvis." --text "What is the capital of France?"

Speech comes from piper (the embedded joe voice) or espeak-ng (`--engine espeak`), resampled
to 16 kHz mono 16-bit, with silence around it. A `|` in the text is a pause mid-sentence
(`--pause` seconds): "What is the capital of | Germany?" is said the way people hesitate.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from companion.devices.audio import read_wav_16k_mono, resample, write_wav
from companion.models import ModelRegistry
from companion.settings import PROJECT_ROOT, TtsSettings
from companion.stages.tts import PiperSynthesizer, VoiceParams

RATE = 16000


def silence(seconds: float) -> bytes:
    return bytes(2 * int(seconds * RATE))


def speak_piper(synth: PiperSynthesizer, text: str, length_scale: float) -> bytes:
    clip = synth._run(text, VoiceParams(length_scale=length_scale))  # blocking: usable anywhere
    return resample(clip.pcm, clip.sample_rate, RATE)


def speak_espeak(text: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "espeak.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)
        return read_wav_16k_mono(path)


def make(out: Path, *, wake: str | None, text: str | None, engine: str = "piper",
         lead_s: float = 0.5, gap_s: float = 0.8, tail_s: float = 1.5,
         pause_s: float = 0.7) -> Path:
    synth = None
    if engine == "piper":
        synth = PiperSynthesizer(TtsSettings(), ModelRegistry(PROJECT_ROOT / "models"))

    def say(words: str) -> bytes:
        return speak_piper(synth, words, 1.0) if synth is not None else speak_espeak(words)

    pcm = silence(lead_s)
    if wake:
        pcm += say(wake) + silence(gap_s)
    if text:
        pieces = [p.strip() for p in text.split("|") if p.strip()]
        pcm += silence(pause_s).join(say(piece) for piece in pieces)
    pcm += silence(tail_s)
    write_wav(out, pcm, RATE)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--wake", default="Hey Jarvis.")
    parser.add_argument("--text", default="What is the capital of France?")
    parser.add_argument("--engine", choices=["piper", "espeak"], default="piper")
    parser.add_argument("--gap", type=float, default=0.8, help="seconds between wake word and question")
    parser.add_argument("--pause", type=float, default=0.7, help="seconds of each | pause")
    args = parser.parse_args()
    make(args.out, wake=args.wake or None, text=args.text or None, engine=args.engine,
         gap_s=args.gap, pause_s=args.pause)
    print(args.out)


if __name__ == "__main__":
    main()
