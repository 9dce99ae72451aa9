"""Personas: who the device is. One TOML (or YAML) file each in the persona library, validated
at load.

A file that fails validation is reported (file and field) and skipped; on reload a broken file
never replaces the good persona already loaded under that id.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from companion.stages.tts import VoiceParams

log = structlog.get_logger(__name__)

SAFE_ID = re.compile(r"^[a-z][a-z0-9_]{0,47}$")

# adaptive personas: the reply's token budget follows the length of what the user said
ADAPTIVE_MIN_TOKENS = 24  # a whole short sentence ("The capital of France is Paris.") fits
ADAPTIVE_TOKENS_PER_WORD = 4
ADAPTIVE_BRIEF_WORDS = 8  # up to this many words, the user gets one short sentence back
ADAPTIVE_SHORT_WORDS = 25  # up to this many, two or three sentences
# a few words that ask for a long answer: "Tell me a story." gets the whole budget
ASKS_FOR_MORE = re.compile(
    r"\b(stor(y|ies)|explain|describe|tell me about|tell me more|poem|song|recipe|list|"
    r"in detail|go on|continue)\b", re.IGNORECASE)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Character(_Strict):
    traits: list[str] = Field(default_factory=list)
    backstory: str = ""
    topics: list[str] = Field(default_factory=list)
    likes: list[str] = Field(default_factory=list)
    dislikes: list[str] = Field(default_factory=list)
    speaking_style: str = ""


class VoiceConfig(_Strict):
    voice: str = Field("en_US-joe-medium", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$",
                       description="piper voice: a name from models/manifest.toml, never a path "
                       "(a persona file must not make the daemon load a file from elsewhere)")
    speaker_id: int | None = Field(None, ge=0)
    length_scale: float = Field(1.0, gt=0.3, le=3.0, description="> 1 speaks slower")
    volume: float = Field(1.0, gt=0.0, le=2.0)

    def params(self) -> VoiceParams:
        return VoiceParams(self.voice, self.speaker_id, self.length_scale, self.volume)


class BehaviorConfig(_Strict):
    temperature: float = Field(0.2, ge=0.0, le=2.0)
    max_tokens: int = Field(96, ge=8, le=2048)
    follow_up_window_s: float = Field(5.0, ge=0.0, le=60.0)
    wake_words: list[str] = Field(default_factory=list, description="wake words that pick it")
    adaptation_mode: Literal["static", "adaptive"] = Field(
        "static", description="static: replies as configured; adaptive: reply length follows "
                              "the user's (a quick question gets a quick answer)")
    allowed_commands: list[str] = Field(default_factory=lambda: ["*"])

    def allows(self, command: str) -> bool:
        return "*" in self.allowed_commands or command in self.allowed_commands

    def reply_tokens(self, user_text: str) -> int:
        """The reply's token budget. An adaptive persona answers a quick question quickly and
        a long message in kind: 4 tokens per word the user said, at least ADAPTIVE_MIN_TOKENS,
        never more than ``max_tokens``; a request for something long ("Tell me a story.")
        gets all of ``max_tokens``. A static persona always has ``max_tokens``."""
        if self.adaptation_mode == "static" or ASKS_FOR_MORE.search(user_text):
            return self.max_tokens
        words = len(user_text.split())
        return min(self.max_tokens, max(ADAPTIVE_MIN_TOKENS, ADAPTIVE_TOKENS_PER_WORD * words))

    def user_turn(self, user_text: str) -> str:
        """The user's words as the model sees them: an adaptive persona adds how long to
        answer, so the reply ends on a whole sentence inside its budget instead of being cut
        off. Only the prompt's last message changes (the cached persona prefix stays valid);
        the store keeps the words as they were said."""
        if self.adaptation_mode == "static" or ASKS_FOR_MORE.search(user_text):
            return user_text
        words = len(user_text.split())
        if words <= ADAPTIVE_BRIEF_WORDS:
            return f"{user_text}\n(Answer in one short sentence.)"
        if words <= ADAPTIVE_SHORT_WORDS:
            return f"{user_text}\n(Answer in two or three sentences.)"
        return user_text


class Example(_Strict):
    """One exchange that shows the model how this persona answers (kept in the cached prompt
    prefix, so it costs nothing per turn; measured with SmolLM2-135M on a 6-question quiz: 22/24
    right with one example against 16/24 without)."""

    user: str = Field(min_length=1, max_length=500)
    assistant: str = Field(min_length=1, max_length=500)


class Persona(_Strict):
    id: str
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    version: str = "1.0.0"
    tags: list[str] = Field(default_factory=list)
    system_prompt: str = Field(min_length=1, max_length=8000)
    character: Character = Character()
    voice_config: VoiceConfig = VoiceConfig()
    behavior_config: BehaviorConfig = BehaviorConfig()
    led_color: str = Field("#3080FF", pattern=r"^#[0-9A-Fa-f]{6}$")
    aliases: list[str] = Field(default_factory=list, description="names a user may say")
    examples: list[Example] = Field(default_factory=list, max_length=4,
                                    description="exchanges that show how it answers")

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        if not SAFE_ID.match(value):
            raise ValueError("must be lower-case letters, digits and _ (a safe file name)")
        return value

    def full_system_prompt(self, *, with_character: bool = False) -> str:
        """The system message: the prompt and speaking style; the rest of the character only
        when asked (measured: a 135M model answers facts worse with it, a 1B model is fine)."""
        c = self.character
        lines = [self.system_prompt.strip()]
        if c.speaking_style:
            lines.append(f"Your style: {c.speaking_style}")
        if not with_character:
            return " ".join(lines)
        if c.traits:
            lines.append(f"Your traits: {', '.join(c.traits)}.")
        if c.backstory:
            lines.append(f"Background: {c.backstory}")
        if c.topics:
            lines.append(f"You like to talk about: {', '.join(c.topics)}.")
        if c.likes:
            lines.append(f"You like: {', '.join(c.likes)}.")
        if c.dislikes:
            lines.append(f"You avoid: {', '.join(c.dislikes)}.")
        return "\n".join(lines)

    def summary(self) -> dict:
        return {"id": self.id, "name": self.name, "description": self.description,
                "version": self.version, "tags": list(self.tags), "led_color": self.led_color}

    def names(self) -> list[str]:
        """What a user may call it: 'the nurse', 'Nora', 'medication nurse'."""
        return [self.name.lower(), self.id.replace("_", " "), *(a.lower() for a in self.aliases)]


@dataclass(frozen=True)
class PersonaError:
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


PERSONA_SUFFIXES = (".toml", ".yaml", ".yml")


def _parse(path: Path) -> object:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        return tomllib.loads(text)
    import yaml  # YAML personas are optional (SPEC §5); PyYAML comes with the model stack

    return yaml.safe_load(text)


def load_persona_file(path: Path, *, voice_exists: Callable[[str], bool] | None = None) -> Persona:
    """Parse and validate one file; raises PersonaFileError naming the file and field."""
    try:
        raw = _parse(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonaFileError([PersonaError(path.name, "(file)", str(exc))]) from exc
    except ImportError as exc:
        raise PersonaFileError([PersonaError(path.name, "(file)", f"cannot read YAML: {exc}")]) from exc
    except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError
        message = " ".join(str(exc).split())
        raise PersonaFileError([PersonaError(path.name, "(syntax)", message)]) from exc
    if not isinstance(raw, dict):
        raise PersonaFileError([PersonaError(path.name, "(root)", "must be a table of fields")])
    try:
        persona = Persona.model_validate(raw)
    except ValidationError as exc:
        errors = [PersonaError(path.name, ".".join(map(str, e["loc"])) or "(root)", e["msg"])
                  for e in exc.errors()]
        raise PersonaFileError(errors) from exc
    if persona.id != path.stem:
        raise PersonaFileError([PersonaError(path.name, "id",
                                             f"{persona.id!r} must match the file name")])
    if voice_exists is not None and not voice_exists(persona.voice_config.voice):
        raise PersonaFileError([PersonaError(path.name, "voice_config.voice",
                                             f"unknown voice {persona.voice_config.voice!r}")])
    return persona


class PersonaFileError(ValueError):
    def __init__(self, errors: list[PersonaError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


class PersonaLibrary:
    """The personas on the device, by id."""

    def __init__(self, directory: Path, *,
                 voice_exists: Callable[[str], bool] | None = None) -> None:
        self.directory = directory
        self.voice_exists = voice_exists
        self._personas: dict[str, Persona] = {}
        self.errors: list[PersonaError] = []

    def load(self) -> list[PersonaError]:
        """(Re)read every file. Good files replace their persona; a bad file is reported and
        the persona it would have replaced stays as it was."""
        errors: list[PersonaError] = []
        found: dict[str, Persona] = {}
        if not self.directory.is_dir():
            errors.append(PersonaError(str(self.directory), "(dir)", "persona directory missing"))
        else:
            paths = sorted(p for p in self.directory.iterdir()
                           if p.suffix in PERSONA_SUFFIXES and not p.name.startswith("."))
            for path in paths:
                try:
                    persona = load_persona_file(path, voice_exists=self.voice_exists)
                except PersonaFileError as exc:
                    errors.extend(exc.errors)
                    log.warning("persona rejected", file=path.name, error=str(exc))
                    if path.stem in self._personas:
                        found[path.stem] = self._personas[path.stem]
                    continue
                if persona.id in found:
                    errors.append(PersonaError(path.name, "id", f"{persona.id!r} is defined twice"))
                    continue
                found[persona.id] = persona
        self._warn_shared_wake_words(found)
        self._personas = found  # one assignment: readers see the old library or the new one
        self.errors = errors
        return errors

    @staticmethod
    def _warn_shared_wake_words(found: dict[str, Persona]) -> None:
        owners: dict[str, str] = {}
        for persona in sorted(found.values(), key=lambda p: p.id):
            for word in persona.behavior_config.wake_words:
                if word in owners:
                    log.warning("wake word claimed twice; the first persona wins", wake_word=word,
                                persona_id=owners[word], ignored=persona.id)
                else:
                    owners[word] = persona.id

    def get(self, persona_id: str) -> Persona | None:
        return self._personas.get(persona_id)

    def __contains__(self, persona_id: str) -> bool:
        return persona_id in self._personas

    def all(self) -> list[Persona]:
        return sorted(self._personas.values(), key=lambda p: p.id)

    def ids(self) -> list[str]:
        return sorted(self._personas)

    def find_by_name(self, spoken: str) -> Persona | None:
        """The persona a user means by 'the nurse', 'nurse', 'Nora' or 'entertainer'."""
        words = re.sub(r"[^a-z0-9 ]", " ", spoken.lower())
        words = re.sub(r"\b(the|a|an|my|to|please|persona|mode)\b", " ", words).split()
        wanted = " ".join(words)
        if not wanted:
            return None
        best = None
        for persona in self._personas.values():
            for name in persona.names():
                if wanted == name:
                    return persona
                if wanted in name.split() or all(w in name.split() for w in words):
                    best = best or persona
        return best

    def for_wake_word(self, word: str) -> Persona | None:
        return next((p for p in self.all() if word in p.behavior_config.wake_words), None)
