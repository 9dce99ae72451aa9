"""Typed event payloads: every event type has one; a wrong field fails where it is emitted."""

from __future__ import annotations

import pytest

from companion.events import PAYLOADS, EventBus, EventType, VolumeChanged


def test_every_event_type_has_a_payload_class():
    assert set(PAYLOADS) == set(EventType)


def test_a_misspelt_or_missing_field_is_an_error_at_emit():
    bus = EventBus()
    seen = []
    bus.add_callback(seen.append)
    with pytest.raises(TypeError, match=r"volume-changed event: .*'volme'"):
        bus.emit(EventType.VOLUME_CHANGED, volme=0.5)
    with pytest.raises(TypeError, match=r"button event: .*'kind'"):
        bus.emit(EventType.BUTTON, button="talk")
    assert seen == []  # nothing half-made went out


def test_the_dict_shape_is_unchanged():
    bus = EventBus()
    event = bus.emit(EventType.VOLUME_CHANGED, "turn_1", volume=0.5, previous=0.8)
    assert event.payload == VolumeChanged(volume=0.5, previous=0.8)
    assert event.data == {"volume": 0.5, "previous": 0.8}
    assert event.as_dict() == {"type": "volume-changed", "turn_id": "turn_1", "t": event.timestamp,
                               "wall_time": event.wall_time, "volume": 0.5, "previous": 0.8}
    listen = bus.emit(EventType.LISTEN_START, "turn_1")
    assert listen.data == {} and set(listen.as_dict()) == {"type", "turn_id", "t", "wall_time"}
