"""WAV input for simulation: converted when it can be, a clear error when it cannot."""

import asyncio
import wave

import numpy as np
import pytest

from companion.devices.audio import AudioFileError, WavFileSink, WavFileSource, read_wav_16k_mono
from companion.stages.tts import AudioClip


def write_wav(path, samples: np.ndarray, *, rate: int, channels: int = 1, width: int = 2) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())


def tone(rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (10000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)


def test_16k_mono_is_read_as_it_is(tmp_path):
    write_wav(tmp_path / "a.wav", tone(16000), rate=16000)
    assert len(read_wav_16k_mono(tmp_path / "a.wav")) == 32000


def test_44k_stereo_is_converted(tmp_path):
    stereo = np.repeat(tone(44100), 2)
    write_wav(tmp_path / "b.wav", stereo, rate=44100, channels=2)
    pcm = np.frombuffer(read_wav_16k_mono(tmp_path / "b.wav"), np.int16)
    assert abs(len(pcm) - 16000) < 20
    assert 8000 < np.abs(pcm).max() < 11000  # the tone survived


def test_8_bit_is_converted(tmp_path):
    samples = (tone(8000) // 256 + 128).astype(np.uint8)
    write_wav(tmp_path / "c.wav", samples, rate=8000, width=1)
    assert abs(len(read_wav_16k_mono(tmp_path / "c.wav")) - 32000) < 40


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(AudioFileError, match="no such file"):
        read_wav_16k_mono(tmp_path / "missing.wav")


def test_a_file_that_is_not_a_wav_says_so(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"ID3 this is an mp3")
    with pytest.raises(AudioFileError, match="not a readable PCM WAV"):
        read_wav_16k_mono(tmp_path / "x.wav")


async def test_wav_source_yields_fixed_blocks_and_trailing_silence(tmp_path):
    write_wav(tmp_path / "a.wav", tone(16000, 0.1), rate=16000)
    source = WavFileSource(tmp_path / "a.wav", realtime=False, block_ms=30, tail_silence_s=0.3)
    async with asyncio.timeout(2):
        blocks = [b async for b in source.blocks()]
    assert all(len(b) == 960 for b in blocks)
    assert len(blocks) == 14  # 0.4 s in 30 ms blocks, the last one padded


async def test_wav_source_paces_in_real_time(tmp_path):
    write_wav(tmp_path / "a.wav", tone(16000, 0.3), rate=16000)
    source = WavFileSource(tmp_path / "a.wav", realtime=True, tail_silence_s=0.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(3):
        [b async for b in source.blocks()]
    assert loop.time() - started >= 0.25


async def test_wav_sink_writes_what_is_played(tmp_path):
    sink = WavFileSink(tmp_path / "out.wav", sample_rate=22050)
    await sink.play(AudioClip(tone(16000, 0.5).tobytes(), 16000))
    sink.close()
    with wave.open(str(tmp_path / "out.wav")) as wav:
        assert wav.getframerate() == 22050
        assert abs(wav.getnframes() - 11025) < 30
