"""Work nobody waits for any more: a client that hangs up before its answer is ready has its queued job
cancelled (10 clicks of departed clients used to run anyway, each holding the worker everyone shares)."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

from starlette.requests import Request


class ClientGoneError(Exception):
    """The client hung up before its answer was ready (nobody reads the answer)."""


async def unless_client_leaves(request: Request, job: Future) -> Any:
    """The result of a job on the worker; when the client hangs up first the job is cancelled (if it has not
    started: a running one finishes) and ClientGoneError raised, so that work nobody waits for is dropped."""
    outcome = asyncio.wrap_future(job)
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({outcome, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not outcome.done():
        job.cancel()
        outcome.add_done_callback(ignore_outcome)
        raise ClientGoneError()
    return outcome.result()


async def wait_for_disconnect(request: Request) -> None:
    """Returns once the client has hung up (its body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def ignore_outcome(outcome: asyncio.Future) -> None:
    """Retrieves an abandoned job's outcome, so that asyncio does not log it as never retrieved."""
    if not outcome.cancelled():
        outcome.exception()
