"""``/jobs/{id}/worker``: where a job's worker process connects (``docs/PROTOCOL.md``).

The handshake carries the job's own credential (``Authorization: Bearer <job token>``), not
the API token: the server's token middleware lets this path through and the route checks the
credential against the job's current run. A refused handshake gets 403; a message that breaks
the protocol closes the connection with 4400 and a reason.
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import APIRouter, Path, WebSocket
from starlette.websockets import WebSocketDisconnect

from trainbus.sdk import CLOSE_PROTOCOL, CLOSE_REPLACED, ProtocolError
from trainbus.worker import Replaced

from ._schemas import JOB_ID_PATTERN
from ._services import services_of
from ._websocket import _refuse

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter()


class _Connection:
    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket

    async def send_text(self, text: str) -> None:
        await self.websocket.send_text(text)

    async def receive_text(self) -> str:
        return await self.websocket.receive_text()


@router.websocket("/jobs/{job_id}/worker", name="job_worker_ws")
async def job_worker_ws(websocket: WebSocket, job_id: str = Path(pattern=JOB_ID_PATTERN)) -> None:
    """A job's worker process: its events in, its commands out."""
    try:
        services = services_of(websocket)
    except Exception:
        await _refuse(websocket, 503, "the server is starting; retry in a moment")
        return
    header = websocket.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    link = services.jobs.worker_link(job_id)
    if link is None or scheme.lower() != "bearer" or not link.accepts(token.strip()):
        await _refuse(websocket, 403, "this credential opens no running job's worker endpoint")
        return
    await websocket.accept()
    try:
        await link.serve(_Connection(websocket))
    except ProtocolError as error:
        replaced = isinstance(error, Replaced)
        if not replaced:
            logger.warning("job %s: its worker broke the protocol: %s", job_id, error)
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
            await websocket.close(CLOSE_REPLACED if replaced else CLOSE_PROTOCOL, str(error)[:120])
        return
    except (WebSocketDisconnect, OSError):
        return
    with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
        await websocket.close(1000, "the run ended")
