"""Everything the device can be asked to do, in one registry (see ``core``).

``build_registry(app)`` is called once by the App; adapters (voice, HTTP, control plane,
buttons, and LLM tools / MCP via ``ActionRegistry.tool_specs``) only translate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from companion.actions import device, handoff, persona, timers
from companion.actions.core import (
    Action,
    ActionError,
    ActionRegistry,
    Context,
    NoArgs,
    Outcome,
    Request,
    iso,
)

if TYPE_CHECKING:
    from companion.app import App


# every action the device has; the OpenAPI document and docs/control-plane.md list these
ALL_ACTIONS: tuple[Action, ...] = (*device.ACTIONS, *persona.ACTIONS, *timers.ACTIONS,
                                   *handoff.ACTIONS)


def build_registry(app: App) -> ActionRegistry:
    return ActionRegistry(app, ALL_ACTIONS)


__all__ = ["ALL_ACTIONS", "Action", "ActionError", "ActionRegistry", "Context", "NoArgs",
           "Outcome", "Request", "build_registry", "iso"]
