"""Plain language → a local command, without the LLM.

"set a timer for five minutes", "be quieter", "stop", "switch to the nurse", "what time is it"
become the same ``{command, args}`` that ``POST /v1/commands`` takes, with a confidence and
whether a person should approve it before it runs. The voice pipeline runs only confident
matches locally (everything else goes to the LLM); ``/v1/commands/parse`` shows the result.

Rules are anchored to the whole utterance: "stop" is a command, "how do I stop snoring" is a
question for the LLM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

VOICE_CONFIDENCE = 0.75  # the pipeline runs a command locally at or above this
APPROVAL_BELOW = 0.7  # below this a person should approve a command (voice and HTTP alike)

UNITS = {"zero": 0, "oh": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
         "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
         "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
         "eighteen": 18, "nineteen": 19, "a": 1, "an": 1, "couple": 2, "few": 3}
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
        "eighty": 80, "ninety": 90}
SECONDS_PER = {"second": 1, "sec": 1, "minute": 60, "min": 60, "hour": 3600, "hr": 3600}
NUMBER_WORD = "|".join(sorted([*UNITS, *TENS, "hundred", "and", "half", "quarter"], key=len,
                              reverse=True))


class PersonaFinder(Protocol):
    def find_by_name(self, spoken: str) -> Any: ...


@dataclass(frozen=True)
class Intent:
    command: str | None
    args: dict[str, Any] = field(default_factory=dict)
    confidence: float = 0.0
    requires_approval: bool = False

    @property
    def parsed(self) -> bool:
        return self.command is not None

    @property
    def needs_approval(self) -> bool:
        """Flagged by its rule, or not confident enough to run unasked."""
        return self.requires_approval or self.confidence < APPROVAL_BELOW


NO_INTENT = Intent(None)


def normalize(text: str) -> str:
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9.%' ]", " ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # keep 2.5, drop full stops
    text = text.replace("'", "")
    text = re.sub(r"^(hey |ok |okay |um |uh |so |now )+", "", " ".join(text.split()))
    text = re.sub(r"^(please |can you |could you |would you |will you )+", "", text)
    return re.sub(r"( please| now| thanks| thank you)+$", "", text).strip()


def words_to_number(words: str) -> float | None:
    """'five' → 5, 'twenty five' → 25, 'a hundred and ten' → 110, '2.5' → 2.5, 'half' → 0.5,
    'one and a half' → 1.5. None when it is not a number."""
    tokens = words.split()
    while tokens and tokens[0] == "and":
        tokens.pop(0)
    if len(tokens) > 1 and tokens[0] in ("a", "an") and tokens[1] not in ("half", "quarter"):
        tokens.pop(0)  # "a 5 minute timer", "a hundred"
    if not tokens:
        return None
    if len(tokens) == 1 and re.fullmatch(r"\d+(\.\d+)?", tokens[0]):
        return float(tokens[0])
    total, current, seen = 0.0, 0.0, False
    fraction = 0.0
    for i, tok in enumerate(tokens):
        if re.fullmatch(r"\d+(\.\d+)?", tok):
            current += float(tok)
        elif tok in UNITS:
            if tok in ("a", "an") and i + 1 < len(tokens) and tokens[i + 1] in ("half", "quarter"):
                continue
            current += UNITS[tok]
        elif tok in TENS:
            current += TENS[tok]
        elif tok == "hundred":
            current = (current or 1) * 100
        elif tok == "half":
            fraction = 0.5
        elif tok == "quarter":
            fraction = 0.25
        elif tok == "and":
            continue
        else:
            return None
        seen = True
    if not seen:
        return None
    return total + current + fraction


_DURATION = re.compile(
    rf"((?:\d+(?:\.\d+)?|{NUMBER_WORD})(?: (?:\d+(?:\.\d+)?|{NUMBER_WORD}))*) "
    r"(second|sec|minute|min|hour|hr)s?\b")


def parse_duration(text: str) -> float | None:
    """Seconds in 'five minutes', 'an hour and a half', '1 hour 30 minutes', 'half an hour',
    '90 seconds'. None when there is none."""
    text = re.sub(r"\bhalf an? (hour|minute)\b", r"0.5 \1s", text)
    total = 0.0
    found = False
    for match in _DURATION.finditer(text):
        number = words_to_number(match.group(1))
        if number is None:
            continue
        total += number * SECONDS_PER[match.group(2)]
        found = True
    if m := re.search(r"\b(second|sec|minute|min|hour|hr)s? and a half\b", text):
        total += 0.5 * SECONDS_PER[m.group(1)]
    return total if found and total > 0 else None


def describe_duration(seconds: float) -> str:
    """75 → '1 minute 15 seconds', 300 → '5 minutes' (what the device says back)."""
    seconds = round(seconds)
    parts = []
    for name, size in (("hour", 3600), ("minute", 60), ("second", 1)):
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n} {name}{'s' if n != 1 else ''}")
    return " ".join(parts) or "0 seconds"


STOP = re.compile(r"^(stop( it| that| talking| speaking| playing| the alarm| the timer)?|"
                  r"be quiet|quiet|shut up|hush|enough|cancel|cancel that|never ?mind|"
                  r"that will do|thats enough|silence)$")
QUIETER = re.compile(r"^((be |speak |talk )?(a (little |bit )?)?(quieter|softer|lower)( please)?|"
                     r"(turn|go) (it |the volume |yourself )?down( a bit)?|"
                     r"(lower|decrease|reduce) (the )?volume|volume down|too loud)$")
LOUDER = re.compile(r"^((be |speak |talk )?(a (little |bit )?)?(louder)|speak up|"
                    r"(turn|go) (it |the volume |yourself )?up( a bit)?|"
                    r"(raise|increase) (the )?volume|volume up|i cant hear you|too quiet)$")
VOLUME_SET = re.compile(r"^(set (the )?)?volume (to |at )?(?P<n>.+?)( percent| %|%)?$")
MUTE = re.compile(r"^(mute( yourself| the microphone| the mic| microphone)?|stop listening|"
                  r"turn off (the )?(microphone|mic))$")
UNMUTE = re.compile(r"^(unmute( yourself| the microphone| the mic)?|start listening again|"
                    r"turn on (the )?(microphone|mic))$")
TIME = re.compile(r"^(what time is it|whats the time|what is the time|tell me the time|"
                  r"the time|time|do you know what time it is|what time it is)$")
DATE = re.compile(r"^(what day is it|whats the date|what is the date|what day is it today|"
                  r"whats todays date|what is todays date|what date is it)$")
HELP = re.compile(r"^(help|what can you do|what commands do you know|list commands)$")
STATUS = re.compile(r"^((device |system )?status( report)?|how are you working)$")
LISTEN = re.compile(r"^(listen|start listening)$")
TIMER_CANCEL = re.compile(r"^(cancel|stop|delete|remove|clear) (the |my |all )?(timers?|alarm)$")
TIMER_LIST = re.compile(r"^(how (much|long) (time )?(is )?(left|remaining)( on (the |my )?timer)?|"
                        r"(list|show) (the |my )?timers|what timers (are|do i have).*)$")
TIMER = re.compile(r"\b(timer|remind me in|countdown|count down|alarm in|wake me in)\b")
PERSONA = re.compile(r"^(switch|change|swap|go)( over)? to (?P<who>.+)$|"
                     r"^(let me|i want to|can i|i would like to) (talk|speak) (to|with) (?P<who2>.+)$|"
                     r"^(talk|speak) (to|with|as) (?P<who3>.+)$|"
                     r"^(become|be) (?P<who4>the .+)$")
YES = re.compile(r"^(yes|yeah|yep|yup|sure|ok|okay|please do|do it|go ahead|yes do it|"
                 r"correct|thats right|right)$")
NO = re.compile(r"^(no|nope|no thanks|dont|do not|dont do it|never ?mind|cancel|stop)$")
SAY = re.compile(r"^(say|repeat after me|repeat) (?P<text>.+)$")


def parse(text: str, personas: PersonaFinder | None = None) -> Intent:
    """The command ``text`` asks for, or NO_INTENT."""
    t = normalize(text)
    if not t:
        return NO_INTENT
    if TIMER_CANCEL.match(t):
        return Intent("timer", {"action": "cancel"}, 0.9)
    if TIMER_LIST.match(t):
        return Intent("timer", {"action": "list"}, 0.85)
    if STOP.match(t):
        return Intent("stop", {}, 0.95)
    if QUIETER.match(t):
        return Intent("volume", {"change": "down"}, 0.9)
    if LOUDER.match(t):
        return Intent("volume", {"change": "up"}, 0.9)
    if m := VOLUME_SET.match(t):
        n = words_to_number(m.group("n"))
        if n is not None:
            percent = n * 10 if n <= 10 and "percent" not in t and "%" not in t else n
            return Intent("volume", {"level": int(max(0, min(100, percent)))}, 0.85)
    if UNMUTE.match(t):
        return Intent("unmute", {}, 0.9)
    if MUTE.match(t):
        # muted, the device cannot hear "unmute": a person should mean it
        return Intent("mute", {}, 0.85, requires_approval=True)
    if TIME.match(t):
        return Intent("time", {}, 0.95)
    if DATE.match(t):
        return Intent("time", {"date": True}, 0.9)
    if HELP.match(t):
        return Intent("help", {}, 0.8)
    if STATUS.match(t):
        return Intent("status", {}, 0.8)
    if LISTEN.match(t):
        return Intent("listen", {}, 0.6, requires_approval=True)
    if TIMER.search(t) or re.match(r"^set an? .*timer", t):
        seconds = parse_duration(t)
        if seconds is not None:
            label = _timer_label(t)
            args: dict[str, Any] = {"seconds": round(seconds, 1)}
            if label:
                args["label"] = label
            return Intent("timer", args, 0.9)
        return Intent("timer", {}, 0.4, requires_approval=True)  # a timer, but for how long?
    if m := PERSONA.match(t):
        who = next(g for g in (m.group("who"), m.group("who2"), m.group("who3"), m.group("who4"))
                   if g)
        persona = personas.find_by_name(who) if personas is not None else None
        if persona is not None:
            return Intent("persona", {"id": persona.id}, 0.9)
        return Intent("persona", {"name": who}, 0.3, requires_approval=True)
    if m := SAY.match(t):
        spoken = re.sub(r"^(say|repeat after me|repeat) ", "", text.strip(), flags=re.I)
        return Intent("say", {"text": spoken or m.group("text")}, 0.6, requires_approval=True)
    return NO_INTENT


def is_yes(text: str) -> bool:
    return bool(YES.match(normalize(text)))


def is_no(text: str) -> bool:
    return bool(NO.match(normalize(text)))


def _timer_label(t: str) -> str | None:
    m = re.search(r".*\b(?:for|to) (?:the |my )?(?!\d)([a-z ]+)$", t)
    if m and parse_duration(m.group(1)) is None and not re.search(
            r"\b(second|minute|hour|timer)s?\b", m.group(1)):
        return m.group(1).strip()
    m = re.search(r"\b([a-z]+) timer\b", t)
    if m and m.group(1) not in ("a", "an", "the", "my", "minute", "second", "hour") and \
            words_to_number(m.group(1)) is None:
        return m.group(1)
    return None
