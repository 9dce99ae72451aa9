"""The buttons adapter: a press (short, long, double) → an action request.

gpiozero's callbacks are already forwarded to the event loop (``devices.gpio.Buttons``); each
press runs its action as a background task so the callback returns at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from companion.actions.core import Context

if TYPE_CHECKING:
    from companion.app import App
    from companion.devices.gpio import ButtonActions


def press(app: App, action: str, args: dict[str, Any] | None = None) -> None:
    app.actions.spawn(app.actions.run(action, args, context=Context("button")),
                      f"button-{action}")


def talk(app: App, kind: str) -> None:
    """Short: listen, or stop whatever is going on; long: stop."""
    if app.voice is None:
        return
    if kind == "long" or (kind == "short" and (app.voice.busy or app.speech.speaking)):
        press(app, "stop")
    elif kind == "short":
        press(app, "listen")


def mute(app: App, kind: str) -> None:
    press(app, "unmute" if app.status.muted else "mute")


def volume(app: App, change: str) -> Callable[[str], None]:
    """Short press: one step (10 %); long press: three."""
    def on_press(kind: str) -> None:
        press(app, "volume", {"change": change, "step": 30 if kind == "long" else 10})
    return on_press


def button_actions(app: App) -> ButtonActions:
    from companion.devices.gpio import ButtonActions

    return ButtonActions(talk=lambda kind: talk(app, kind), mute=lambda kind: mute(app, kind),
                         volume_up=volume(app, "up"), volume_down=volume(app, "down"))
