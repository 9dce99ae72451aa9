"""Buttons and LEDs over gpiozero, kept outside the core: the LED follows bus events, buttons
call back into the daemon.

gpiozero calls ``when_pressed`` on its own thread; every callback is forwarded to the event
loop with ``call_soon_threadsafe`` so no daemon state is touched from a foreign thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from companion.events import Event, EventBus, EventType, PipelineState
from companion.settings import GpioSettings

log = structlog.get_logger(__name__)

# colour (r, g, b in 0..1) and pattern per pipeline state; "persona" uses the persona's colour
STATE_LOOK: dict[PipelineState, tuple[tuple[float, float, float] | None, str]] = {
    PipelineState.IDLE: (None, "dim"),
    PipelineState.LISTENING: ((0.0, 0.4, 1.0), "solid"),
    PipelineState.THINKING: ((0.6, 0.0, 1.0), "pulse"),
    PipelineState.SPEAKING: (None, "solid"),
    PipelineState.MUTED: ((1.0, 0.0, 0.0), "solid"),
    PipelineState.ERROR: ((1.0, 0.3, 0.0), "blink"),
}


def hex_to_rgb(color: str) -> tuple[float, float, float]:
    color = color.lstrip("#")
    return tuple(int(color[i : i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


# Buttons with no double-press action act at release: waiting out the double-press window would
# delay listening by gpio.double_press_s (0.4 s) and lose the user's first words.
IMMEDIATE_BUTTONS = frozenset({"talk", "volume_up", "volume_down"})


@dataclass
class ButtonActions:
    talk: Callable[[str], None]  # kind: short | long | double
    mute: Callable[[str], None]
    volume_up: Callable[[str], None] | None = None
    volume_down: Callable[[str], None] | None = None


class LedIndicator:
    """Shows the pipeline state on an RGB LED; a control-plane ``led_control`` overrides it for
    a while, then the state display returns."""

    def __init__(self, led, bus: EventBus, persona_color: Callable[[], str]) -> None:
        self.led = led
        self.persona_color = persona_color
        self.state = PipelineState.IDLE
        self.override_until = 0.0
        self.last_look: tuple[tuple[float, float, float], str] | None = None
        self._unsubscribe = bus.add_callback(self.on_event)
        self.show_state()

    def on_event(self, event: Event) -> None:
        if event.type is EventType.STATE_CHANGED:
            self.state = PipelineState(event.data["state"])
            if time.monotonic() >= self.override_until:
                self.show_state()
        elif event.type is EventType.PERSONA_SWITCHED and time.monotonic() >= self.override_until:
            self.show_state()

    def override(self, color: str, pattern: str, duration_ms: int) -> None:
        self.override_until = time.monotonic() + duration_ms / 1000
        self._show(hex_to_rgb(color), pattern)
        asyncio.get_running_loop().call_later(duration_ms / 1000, self._override_over)

    def _override_over(self) -> None:
        if time.monotonic() >= self.override_until - 0.001:
            self.override_until = 0.0
            self.show_state()

    def show_state(self) -> None:
        color, pattern = STATE_LOOK[self.state]
        if color is None:
            color = hex_to_rgb(self.persona_color())
        if pattern == "dim":
            color, pattern = tuple(c * 0.1 for c in color), "solid"  # type: ignore[assignment]
        self._show(color, pattern)  # type: ignore[arg-type]

    def _show(self, color: tuple[float, float, float], pattern: str) -> None:
        self.last_look = (color, pattern)
        if pattern == "off":
            self.led.off()
        elif pattern == "blink":
            self.led.blink(on_time=0.3, off_time=0.3, on_color=color, background=True)
        elif pattern == "pulse":
            self.led.pulse(fade_in_time=0.6, fade_out_time=0.6, on_color=color, background=True)
        else:
            self.led.color = color

    def close(self) -> None:
        self._unsubscribe()
        self.led.close()


class Buttons:
    """Short, long and double presses of the talk, mute and volume buttons."""

    def __init__(self, settings: GpioSettings, actions: ButtonActions, bus: EventBus,
                 loop: asyncio.AbstractEventLoop) -> None:
        from gpiozero import Button

        self.settings = settings
        self._loop = loop
        self._bus = bus
        self._buttons = []
        self._last_release: dict[str, float] = {}
        self._pending: dict[str, asyncio.TimerHandle] = {}
        self._held: set[str] = set()
        for name, pin, action in (
            ("talk", settings.talk_button_pin, actions.talk),
            ("mute", settings.mute_button_pin, actions.mute),
            ("volume_up", settings.volume_up_pin, actions.volume_up),
            ("volume_down", settings.volume_down_pin, actions.volume_down),
        ):
            if pin is None or action is None:
                continue
            button = Button(pin, hold_time=settings.long_press_s, bounce_time=0.02)
            button.when_held = self._threadsafe(self._on_held, name, action)
            button.when_released = self._threadsafe(self._on_released, name, action)
            self._buttons.append(button)

    def _threadsafe(self, fn, name, action):
        return lambda *_: self._loop.call_soon_threadsafe(fn, name, action)

    def _on_held(self, name: str, action: Callable[[str], None]) -> None:
        self._held.add(name)
        self._fire(name, "long", action)

    def _on_released(self, name: str, action: Callable[[str], None]) -> None:
        if name in self._held:
            self._held.discard(name)
            return
        if name in IMMEDIATE_BUTTONS:  # no double press to wait for: listen at once
            self._fire(name, "short", action)
            return
        pending = self._pending.pop(name, None)
        if pending is not None:  # second press within the window
            pending.cancel()
            self._fire(name, "double", action)
            return
        self._pending[name] = self._loop.call_later(
            self.settings.double_press_s, self._single, name, action)

    def _single(self, name: str, action: Callable[[str], None]) -> None:
        self._pending.pop(name, None)
        self._fire(name, "short", action)

    def _fire(self, name: str, kind: str, action: Callable[[str], None]) -> None:
        self._bus.emit(EventType.BUTTON, button=name, kind=kind)
        action(kind)

    def close(self) -> None:
        for handle in self._pending.values():
            handle.cancel()
        for button in self._buttons:
            button.close()


def make_gpio(settings: GpioSettings):
    """Set the pin factory (before any device is made) and build the RGB LED, or raise."""
    from gpiozero import RGBLED, Device

    if settings.pin_factory == "mock":
        from gpiozero.pins.mock import MockFactory, MockPWMPin

        Device.pin_factory = MockFactory(pin_class=MockPWMPin)
    elif settings.pin_factory:
        import os

        os.environ["GPIOZERO_PIN_FACTORY"] = settings.pin_factory
        Device.pin_factory = None  # chosen again from the environment by the next device
    if None in (settings.led_red_pin, settings.led_green_pin, settings.led_blue_pin):
        return None
    return RGBLED(settings.led_red_pin, settings.led_green_pin, settings.led_blue_pin, pwm=True)
