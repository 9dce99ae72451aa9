"""Per-client-IP rate limiting of /v1 (fixed one-minute windows), and the cap on chats that wait
for the model at once (``ChatSlots``)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

from aiohttp import web

from companion.api.common import EXTRA_HEADERS, LIMITER, ApiError


class RateLimiter:
    """Fixed one-minute window per client IP: cheap, bounded in memory, easy to explain in a
    header (X-RateLimit-Reset = seconds until the window ends)."""

    def __init__(self, limit: int, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_clients: int = 4096) -> None:
        self.limit, self.window_s, self.clock, self.max_clients = limit, window_s, clock, max_clients
        self._windows: dict[str, tuple[float, int]] = {}

    def hit(self, client: str) -> tuple[bool, int, int]:
        """Count one request: (allowed, remaining, seconds until reset)."""
        now = self.clock()
        start, count = self._windows.get(client, (now, 0))
        if now - start >= self.window_s:
            start, count = now, 0
        allowed = count < self.limit
        if allowed:
            count += 1
        if client not in self._windows and len(self._windows) >= self.max_clients:
            self._prune(now)
        self._windows[client] = (start, count)
        reset = max(1, math.ceil(start + self.window_s - now))
        return allowed, max(0, self.limit - count), reset

    def _prune(self, now: float) -> None:
        for key, (start, _) in list(self._windows.items()):
            if now - start >= self.window_s:
                del self._windows[key]
        while len(self._windows) >= self.max_clients:  # all live: forget the oldest
            del self._windows[min(self._windows, key=lambda k: self._windows[k][0])]


@web.middleware
async def rate_limit_middleware(request: web.Request, handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)  # probes and metrics are never throttled
    allowed, remaining, reset = request.app[LIMITER].hit(request.remote or "unknown")
    headers = {"X-RateLimit-Limit": str(request.app[LIMITER].limit),
               "X-RateLimit-Remaining": str(remaining), "X-RateLimit-Reset": str(reset)}
    request[EXTRA_HEADERS] = headers
    if not allowed:
        raise ApiError(429, "RATE_LIMITED", "too many requests; slow down",
                       {"retry_after": reset, "limit": request.app[LIMITER].limit},
                       {**headers, "Retry-After": str(reset)})
    return await handler(request)


class ChatSlots:
    """At most ``limit`` chats generating or queued for the one model thread. Without a cap a
    burst queues for ever behind itself and every late request waits out the turn timeout (a
    504 after a minute); with it the extra ones hear 503 at once, with a Retry-After from how
    long recent chats took."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.clock = limit, clock
        self.active = 0
        self.typical_s = 2.0  # moving average of a chat's duration (a first guess until measured)

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.active >= self.limit:
            wait = max(1, math.ceil(self.typical_s * self.active / self.limit))
            raise ApiError(503, "BUSY", "too many chats at once; retry later",
                           {"retry_after": wait, "active": self.active, "limit": self.limit},
                           {"Retry-After": str(wait)})
        self.active += 1
        started = self.clock()
        try:
            yield
        finally:
            self.active -= 1
            self.typical_s = 0.8 * self.typical_s + 0.2 * (self.clock() - started)
