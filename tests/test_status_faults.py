"""A component fault (the disk refusing writes) shows as the error state at rest, never over a
turn in progress or the mute light, and clears by itself."""

from companion.events import EventBus, PipelineState
from companion.state import DeviceStatus


def test_a_fault_shows_at_rest_and_clears_by_itself() -> None:
    status = DeviceStatus(EventBus(), "dev")
    status.set_fault("storage", "the disk is full")
    assert status.pipeline_state is PipelineState.ERROR
    status.set_state(PipelineState.LISTENING)  # a turn still runs and shows as such
    assert status.pipeline_state is PipelineState.LISTENING
    status.set_state(PipelineState.IDLE)  # back at rest: the fault again
    assert status.pipeline_state is PipelineState.ERROR
    status.set_fault("storage", None)
    assert status.pipeline_state is PipelineState.IDLE


def test_the_mute_light_wins_over_a_fault() -> None:
    status = DeviceStatus(EventBus(), "dev")
    status.muted = True
    status.set_state(PipelineState.IDLE)
    status.set_fault("storage", "the disk is full")
    assert status.pipeline_state is PipelineState.MUTED  # the microphone's state is privacy
