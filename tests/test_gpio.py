"""Buttons and LEDs through gpiozero's mock pin factory (the real gpiozero code)."""

import asyncio

import pytest

from companion.app import Features
from companion.events import EventType, PipelineState
from tests.conftest import fake_app, make_settings, until
from tests.fakes import BLOCK, FakeMic, speech_block

GPIO_FEATURES = Features(audio_devices=False, http=False, control=False, gpio=True,
                         warm_personas=False)


@pytest.fixture
def gpio_app(tmp_path):
    settings = make_settings(tmp_path, gpio={"enabled": True, "pin_factory": "mock",
                                             "double_press_s": 0.15, "long_press_s": 0.3},
                             pipeline={"follow_up_window_s": 0})
    mic = FakeMic([BLOCK] * 40 + [speech_block()] * 20 + [BLOCK] * 40, delay_s=0.004)
    return fake_app(settings, features=GPIO_FEATURES, source=mic)


async def press(pin, hold_s: float = 0.02) -> None:
    """A finger on the button for ``hold_s``: the hold is the input (gpiozero times presses
    on the wall clock), not a wait for something to happen."""
    pin.drive_low()
    await asyncio.sleep(hold_s)
    pin.drive_high()




async def test_talk_button_starts_a_turn_and_the_led_follows_the_state(gpio_app):
    app = gpio_app
    events = []
    app.bus.add_callback(events.append)
    await app.start()
    app._start_gpio()
    assert app.status.components["gpio"]["healthy"]
    led = app.led
    buttons = app.buttons
    pump = asyncio.create_task(app.voice.run())
    await press(buttons._buttons[0].pin)
    await until(lambda: any(e.type is EventType.TURN_START for e in events))
    start = next(e for e in events if e.type is EventType.TURN_START)
    assert start.data["trigger"] == "button"
    press_event = next(e for e in events if e.type is EventType.BUTTON)
    assert press_event.data == {"button": "talk", "kind": "short"}
    await until(lambda: led.state is PipelineState.LISTENING)
    assert led.last_look == ((0.0, 0.4, 1.0), "solid")
    await pump
    await app.voice.wait_idle()
    assert any(e.type is EventType.TURN_END for e in events)
    await until(lambda: led.state is PipelineState.IDLE)
    await app.aclose()


async def test_mute_button_toggles_the_microphone_and_the_led_turns_red(gpio_app):
    app = gpio_app
    await app.start()
    app._start_gpio()
    led = app.led
    mute_pin = app.buttons._buttons[1].pin
    await press(mute_pin)
    await until(lambda: app.status.muted)
    assert app.status.pipeline_state is PipelineState.MUTED
    assert led.last_look == ((1.0, 0.0, 0.0), "solid")
    await press(mute_pin)
    await until(lambda: not app.status.muted)
    assert app.status.pipeline_state is PipelineState.IDLE
    await app.aclose()


async def test_double_and_long_presses_are_told_apart(gpio_app):
    app = gpio_app
    kinds = []
    app.bus.add_callback(lambda e: kinds.append(e.data["kind"]) if e.type is EventType.BUTTON else None)
    await app.start()
    app._start_gpio()
    pin = app.buttons._buttons[1].pin  # mute: it tells double presses apart
    await press(pin)
    await asyncio.sleep(0.05)  # the gap between the two presses of a double press (input)
    await press(pin)
    await until(lambda: "double" in kinds)
    await press(pin, hold_s=0.5)
    await until(lambda: "long" in kinds)
    assert kinds == ["double", "long"]
    await app.aclose()


async def test_led_override_then_back_to_the_state_display(gpio_app):
    app = gpio_app
    await app.start()
    app._start_gpio()
    led = app.led
    led.override("#00FF00", "solid", 100)
    assert led.last_look == ((0.0, 1.0, 0.0), "solid")
    await until(lambda: led.last_look != ((0.0, 1.0, 0.0), "solid"))
    assert led.override_until == 0.0
    await app.aclose()


async def test_no_gpio_chip_leaves_the_daemon_running(tmp_path):
    settings = make_settings(tmp_path, gpio={"enabled": True, "pin_factory": "nonexistent"})
    app = fake_app(settings, features=GPIO_FEATURES)
    await app.start()
    app._start_gpio()
    assert app.status.components["gpio"]["healthy"] is False
    await app.aclose()


async def test_the_talk_button_listens_on_release_without_waiting_for_a_double_press(gpio_app):
    app = gpio_app
    events = []
    app.bus.add_callback(events.append)
    await app.start()
    app._start_gpio()
    pin = app.buttons._buttons[0].pin
    loop = asyncio.get_running_loop()
    await press(pin)
    released = loop.time()
    await until(lambda: any(e.type is EventType.TURN_START for e in events))
    assert loop.time() - released < app.settings.gpio.double_press_s / 2
    await app.aclose()


async def test_volume_buttons_step_the_volume_through_the_volume_action(tmp_path):
    settings = make_settings(tmp_path, gpio={"enabled": True, "pin_factory": "mock",
                                             "volume_up_pin": 23, "volume_down_pin": 24,
                                             "long_press_s": 0.3})
    app = fake_app(settings, features=GPIO_FEATURES)
    changes = []
    app.bus.add_callback(lambda e: changes.append(e.data["volume"])
                         if e.type is EventType.VOLUME_CHANGED else None)
    await app.start()
    app._start_gpio()
    up, down = (b.pin for b in app.buttons._buttons if b.pin.number in (23, 24))
    await press(up)
    await until(lambda: changes == [0.9])
    await press(down)
    await press(down)
    await until(lambda: len(changes) == 3)
    assert changes == [0.9, 0.8, 0.7] and app.sink.volume == pytest.approx(0.7)
    await app.aclose()


async def test_the_mute_button_without_a_microphone_still_reports_the_change(tmp_path):
    settings = make_settings(tmp_path, gpio={"enabled": True, "pin_factory": "mock",
                                             "double_press_s": 0.05})
    app = fake_app(settings, features=GPIO_FEATURES)  # no source: no voice loop
    muted = []
    app.bus.add_callback(lambda e: muted.append(e.data["muted"])
                         if e.type is EventType.MUTE_CHANGED else None)
    await app.start()
    app._start_gpio()
    assert app.voice is None
    await press(app.buttons._buttons[1].pin)
    await until(lambda: muted == [True])
    assert app.status.muted
    await app.aclose()
