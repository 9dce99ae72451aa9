"""One module per domain; importing them registers their routes in ``common.ROUTES``."""

from companion.api.common import ROUTES, Route
from companion.api.routes import chat, commands, health, metrics, personas, sessions, system

# the order routes are served and listed in the OpenAPI document
MODULES = (health, chat, commands, system, personas, sessions, metrics)


def ordered() -> list[Route]:
    order = [m.__name__ for m in MODULES]
    return sorted(ROUTES, key=lambda r: order.index(r.handler.__module__))
