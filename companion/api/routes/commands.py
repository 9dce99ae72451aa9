"""/v1/commands (an adapter over the action registry) and /v1/commands/parse."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from companion.actions import ActionError, Context, iso
from companion.actions.core import REPORTED_AS_FAILED
from companion.api import schemas as s
from companion.api.common import ApiError, app_of, route
from companion.intents import parse as parse_intent


@route("POST", "/v1/commands", summary="Run a device command", tag="commands",
       body=s.CommandRequest, response=s.CommandResponse, errors=(403, 404))
async def run_command(request: web.Request, body: s.CommandRequest) -> s.CommandResponse:
    """An unknown command is a 404 whose details list the known ones; a persona may forbid
    some (403); one the device could not do (no microphone, no speaker) is ``failed``."""
    app = app_of(request)
    try:
        async with asyncio.timeout(330):
            outcome = await app.actions.run(body.command, body.args, context=Context("api"))
    except ActionError as exc:
        if exc.code not in REPORTED_AS_FAILED:
            raise ApiError(exc.status, exc.code, exc.message, exc.details) from exc
        return s.CommandResponse(command=body.command, status="failed",
                                 result={"error": exc.message, "code": exc.code, **exc.details},
                                 executed_at=iso(time.time()))
    if outcome.after is not None:
        app.actions.spawn(outcome.after(), f"{body.command}-after")
    return s.CommandResponse(command=body.command, status="completed", result=outcome.result,
                             executed_at=outcome.executed_at)


@route("POST", "/v1/commands/parse", summary="Plain language to a command, without running it",
       tag="commands", body=s.ParseRequest, response=s.ParseResponse)
async def parse_command(request: web.Request, body: s.ParseRequest) -> s.ParseResponse:
    """The parser the voice pipeline uses before the LLM."""
    intent = parse_intent(body.input, app_of(request).personas)
    command = (s.ParsedCommand(command=intent.command, args=intent.args)
               if intent.command is not None else None)
    return s.ParseResponse(input=body.input, parsed=intent.parsed, command=command,
                           confidence=intent.confidence,
                           requires_approval=intent.needs_approval)
