"""End of turn on the real models: SmolLM2 tells finished questions from unfinished ones, and
questions with a pause mid-sentence come through whole (piper's voice and espeak-ng's), while
a complete question ends after a short silence."""

import asyncio
import wave

import pytest

from companion.devices.audio import read_wav_16k_mono
from companion.models import ModelRegistry
from companion.settings import CompanionSettings, TurnSettings
from companion.stages.llm import LlamaCppChatModel
from companion.stages.turn import normalize_transcript
from scripts.make_utterance_wav import make
from tests.test_simulate_real import companion, read_events

pytestmark = pytest.mark.models

SYSTEM = {"role": "system", "content": "You are a friendly voice assistant. Answer briefly."}
# as Whisper writes them at a pause: it punctuates the unfinished ones too
FINISHED = ["What is the capital of Germany?", "How many legs does an octopus have?",
            "What's the capital of France?", "Tell me three interesting facts about the moon, please."]
UNFINISHED = ["What is the capital of?", "How many legs?", "Tell me three interesting facts about.",
              "I want to.", "Can you explain why in the..."]
CLIPS = ["What is the capital of | Germany?", "How many legs | does an octopus have?",
         "What is the capital of France?"]


def test_the_llm_scores_finished_questions_above_the_threshold_and_unfinished_below():
    settings = CompanionSettings()
    llm = LlamaCppChatModel(settings.llm, ModelRegistry(settings.models_dir))
    threshold = TurnSettings().complete_threshold

    async def score(text: str) -> float:
        words = normalize_transcript(text)
        return await llm.end_of_turn_probability([SYSTEM, {"role": "user", "content": words}])

    async def scores(texts: list[str]) -> list[float]:
        return [await score(t) for t in texts]

    finished = asyncio.run(scores(FINISHED))
    unfinished = asyncio.run(scores(UNFINISHED))
    assert min(finished) >= threshold, list(zip(FINISHED, finished, strict=True))
    assert max(unfinished) < threshold, list(zip(UNFINISHED, unfinished, strict=True))


def microphone(path, engine: str) -> str:
    """The three clips, each after "Hey Jarvis.", with quiet between them."""
    pcm = b""
    for i, text in enumerate(CLIPS):
        clip = make(path.parent / f"{engine}-{i}.wav", wake="Hey Jarvis.", text=text, engine=engine,
                    pause_s=0.7)
        pcm += read_wav_16k_mono(clip) + bytes(2 * 16000)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(pcm)
    return str(path)


@pytest.mark.parametrize("engine", ["piper", "espeak"])
def test_a_pause_mid_sentence_does_not_cut_the_question_and_a_finished_one_ends_soon(tmp_path, engine):
    events_path = tmp_path / "events.jsonl"
    result = companion("simulate", "--input", microphone(tmp_path / "mic.wav", engine),
                       "--output", str(tmp_path / "out.wav"), "--events", str(events_path), "--fast",
                       env={"COMPANION_PIPELINE__FOLLOW_UP_WINDOW_S": "0",
                            "COMPANION_PIPELINE__TURN_TIMEOUT_S": "300"}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    events = read_events(events_path)
    ends = [e for e in events if e["type"] == "speech-end"]
    texts = [normalize_transcript(e["text"]).lower() for e in events if e["type"] == "stt-end"]
    assert len(ends) == len(texts) == 3, texts  # one utterance per clip: nothing was split
    assert "capital" in texts[0] and "germany" in texts[0]
    assert "legs" in texts[1] and "octopus" in texts[1]
    assert ends[0]["end_reason"] == ends[1]["end_reason"] == "complete"
    judged = [e for e in events if e["type"] == "end-of-turn"]
    assert any(e["end_reason"] == "incomplete" for e in judged)  # the pauses were judged
    # the finished question ends after a short silence, not the long window
    assert ends[2]["end_reason"] == "complete" and ends[2]["silence_s"] < 0.5, ends[2]
    # each answer was begun at its final pause (judged complete), and each was kept once
    starts = [e for e in events if e["type"] == "llm-start"]
    assert len(starts) == 3 and all(e["speculative"] for e in starts), starts
    assert len([e for e in events if e["type"] == "exchange-recorded"]) == 3


def test_an_answer_begun_at_a_pause_is_dropped_when_the_question_goes_on(tmp_path):
    """ "What is the capital of Germany" is a whole question: at its pause the answer begins;
    then "and of France?" follows. Only the whole question is answered and kept.

    The closing silence of a complete question is raised to 0.9 s here: with piper's own
    silence around each piece the 0.22 s pause is 0.27 s to the VAD (webrtcvad, 30 ms blocks),
    over the default 0.25 s, where the turn rightly ends at "Germany" (a complete question,
    then a quarter of a second of silence; the clean-clone CI run showed it)."""
    clip = make(tmp_path / "q.wav", wake="Hey Jarvis.",
                text="What is the capital of Germany | and of France?", pause_s=0.22)
    events_path = tmp_path / "events.jsonl"
    result = companion("simulate", "--input", str(clip), "--output", str(tmp_path / "out.wav"),
                       "--events", str(events_path), "--fast",
                       env={"COMPANION_PIPELINE__FOLLOW_UP_WINDOW_S": "0",
                            "COMPANION_TURN__COMPLETE_SILENCE_S": "0.9",
                            "COMPANION_PIPELINE__TURN_TIMEOUT_S": "300"}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    events = read_events(events_path)
    judged = [e for e in events if e["type"] == "end-of-turn"]
    assert judged[0]["end_reason"] == "complete", judged  # the answer was begun there
    assert len([e for e in events if e["type"] == "speech-end"]) == 1
    starts = [e for e in events if e["type"] == "llm-start"]
    kept = [e for e in events if e["type"] == "exchange-recorded"]
    assert len(starts) == 1 and len(kept) == 1, (starts, kept)
    assert "france" in kept[0]["user_text"].lower() and "germany" in kept[0]["user_text"].lower()
    played = [e for e in events if e["type"] == "playback-start"]
    assert played and all(e["turn_id"] == kept[0]["turn_id"] for e in played)


def test_the_end_of_turn_check_reads_only_the_new_words():
    """The persona prompt is kept by llama.cpp (a warm prefix), and each pause's check shares
    everything up to the words with the one before: only the user's words are evaluated."""
    settings = CompanionSettings()
    llm = LlamaCppChatModel(settings.llm, ModelRegistry(settings.models_dir))

    def user(words: str) -> list:
        return [SYSTEM, {"role": "user", "content": words}]

    async def run() -> list[int]:
        await llm.warm_prefix("persona", [SYSTEM])
        counts = []
        for words in ("What is the capital of", "What is the capital of Germany"):
            await llm.end_of_turn_probability(user(words))
            counts.append(llm.last_prompt_eval_tokens)
        return counts

    try:
        first, second = asyncio.run(run())
        words, new = len(llm._tokenize("What is the capital of")), len(llm._tokenize(" Germany"))
    finally:
        llm.close()
    assert first <= words + 4  # the words and the user header, not the system prompt
    assert second <= new + 1  # only the new word


def test_whisper_keeps_what_follows_a_pause_after_a_whole_question(tmp_path):
    """Without timestamps Whisper writes one segment and stops: "What is the capital of Germany
    … and of France?" came out as "What is the capital of Germany?"."""
    from companion.stages.stt import FasterWhisperTranscriber

    settings = CompanionSettings()
    stt = FasterWhisperTranscriber(settings.stt, ModelRegistry(settings.models_dir))
    try:
        # what is said after the pause is kept: some words follow the pause's last word
        # (piper's voice varies from run to run, so "an ant" may come out as "end in that")
        for text, pause_s, before in (("What is the capital of Germany | and of France?", 0.22,
                                       "germany"),
                                      ("How many legs does a spider have | and an ant?", 0.3,
                                       "have")):
            clip = make(tmp_path / "q.wav", wake=None, text=text, pause_s=pause_s, lead_s=0.3,
                        tail_s=0.5)
            heard = asyncio.run(stt.transcribe(read_wav_16k_mono(clip))).text.lower()
            words = normalize_transcript(heard).replace(",", " ").split()
            assert before in words and len(words) - words.index(before) - 1 >= 2, heard
    finally:
        stt.close()


def test_going_on_after_a_whole_phrase_is_answered_as_one_question(tmp_path):
    """ "Please give me a short recipe for pancakes" is a whole request: the turn ends a
    quarter of a second into the 0.7 s pause and its answer is prepared; "with bananas and
    honey" follows before any of it is heard. In real time (the file paced like a microphone),
    the prepared answer is dropped and the whole request is answered and kept, once."""
    clip = make(tmp_path / "q.wav", wake="Hey Jarvis.",
                text="Please give me a short recipe for pancakes | with bananas and honey.",
                pause_s=0.7)
    events_path = tmp_path / "events.jsonl"
    result = companion("simulate", "--input", str(clip), "--output", str(tmp_path / "out.wav"),
                       "--events", str(events_path),
                       env={"COMPANION_PIPELINE__FOLLOW_UP_WINDOW_S": "0",
                            "COMPANION_PIPELINE__TURN_TIMEOUT_S": "300"}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    events = read_events(events_path)
    ends = [e for e in events if e["type"] == "speech-end"]
    resumed = [e for e in events if e["type"] == "speech-resumed"]
    assert ends[0]["end_reason"] == "complete", ends  # "... for pancakes" ended the turn
    assert len(resumed) == 1 and len(ends) == 2, (resumed, ends)
    kept = [e for e in events if e["type"] == "exchange-recorded"]
    assert len(kept) == 1, kept
    said = kept[0]["user_text"].lower()
    assert "pancakes" in said and "honey" in said, said
    last_end = events.index(ends[-1])
    played = [i for i, e in enumerate(events) if e["type"] == "playback-start"]
    assert played and min(played) > last_end  # nothing of the first answer was heard
