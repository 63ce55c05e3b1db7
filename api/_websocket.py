"""WebSocket streaming: ``/jobs/{id}/events/ws`` (replay, then live) and ``/events/ws`` (live).

Each message is one JSON event, or a JSON array of events when several are pending. For one
job, the connection joins the live hub first, then replays the store from ``after_seq`` up to
the bus's last ``seq`` at joining, then forwards live events it has not sent yet: neither a
gap nor a duplicate at the seam. Events the client's buffer dropped are refetched from the
store; where the store cannot supply them the client gets a ``gap`` event.

The all-jobs stream promises live events only: it takes no ``after_seq`` (a request with one is
refused with 422). A client that must not miss anything follows each job on its own stream,
which resumes exactly from the last ``seq`` it saw.

The streams only send: a client message of any kind is a protocol violation.

Handshakes are refused before they are accepted (an HTTP 401/403/404/422 response with a JSON
``detail``). Close codes after accepting: 1001 the server is shutting down; 1003 the client
sent a binary message; 1008 the client sent a text message; 1009 the client sent a message
over :data:`MAX_CLIENT_MESSAGE_BYTES`; 4008 too slow (the client missed more than
``ws_max_lag`` events, or did not take a message, live or replayed, within ``ws_send_timeout``;
the reason reads ``too slow; resume with after_seq=<n>``); 4404 the job was deleted. A client
that reads neither its messages nor the close frame is dropped (1006). A client that goes
away mid-stream ends its stream quietly (a debug line), not with an error.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from operator import itemgetter

import anyio
from fastapi import APIRouter, Path, Query, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from trainbus.bus import EventType, UnknownEventName, event_type_for

from ._auth import SUBPROTOCOL, offered_subprotocols
from ._history import EventHistory
from ._hub import ClientBuffer, Item, encode_event, gap_notice
from ._schemas import JOB_ID_PATTERN
from ._services import Services, has_events, services_of

__all__ = [
    "CLOSE_JOB_DELETED",
    "CLOSE_TOO_SLOW",
    "MAX_CLIENT_MESSAGE_BYTES",
    "close_job_streams",
    "router",
]

logger = logging.getLogger(__name__)

CLOSE_TOO_SLOW = 4008
"""Close code for a client that fell too far behind; the reason names the seq to resume after."""
CLOSE_JOB_DELETED = 4404
"""Close code for the streams of a job that was deleted while they followed it."""
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY = 1008
MAX_CLIENT_MESSAGE_BYTES = 4096
"""The largest client message the server reads (uvicorn's ``ws_max_size``; past it: 1009).
The streams take no client messages at all; this bounds what a hostile one can make us hold."""

router = APIRouter()


def close_job_streams(services: Services, job_id: str) -> int:
    """Close the streams that follow ``job_id`` (code 4404): it was deleted."""
    return services.hub.close_job(job_id, CLOSE_JOB_DELETED, "job deleted")


def _parse_types(raw: str | None) -> frozenset[EventType] | None:
    if raw is None or not raw.strip():
        return None
    return frozenset(event_type_for(name.strip()) for name in raw.split(",") if name.strip())


_text = itemgetter(2)


def _message(items: Sequence[Item]) -> str:
    """One message: the event, or a JSON array of the events (joined at C speed: this runs for
    every client on every round of the fan-out)."""
    return items[0][2] if len(items) == 1 else "[" + ",".join(map(_text, items)) + "]"


def _size(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (``isascii`` is a flag lookup: most events need no encoding)."""
    return len(text) if text.isascii() else len(text.encode())


def _messages(items: list[Item], max_events: int, max_bytes: int) -> list[list[Item]]:
    """``items`` cut into messages of at most ``max_events`` events and ``max_bytes`` of JSON."""
    if len(items) <= max_events and sum(map(_size, map(_text, items))) + len(items) <= max_bytes:
        return [items]  # the usual case, checked at C speed
    chunks: list[list[Item]] = []
    chunk: list[Item] = []
    size = 0
    for item in items:
        length = _size(item[2]) + 1  # the comma or bracket
        if chunk and (len(chunk) == max_events or size + length > max_bytes):
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(item)
        size += length
    if chunk:
        chunks.append(chunk)
    return chunks


async def _refuse(websocket: WebSocket, status: int, detail: str) -> None:
    from fastapi.responses import JSONResponse

    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse({"detail": detail}, status_code=status))
    else:
        await websocket.close(CLOSE_POLICY, detail[:120])


class _Stream:
    """One connection's sending side."""

    def __init__(
        self,
        websocket: WebSocket,
        services: Services,
        client: ClientBuffer,
        job_id: str | None,
        types: frozenset[EventType] | None,
        last_sent: int,
    ) -> None:
        self.websocket = websocket
        self.services = services
        self.client = client
        self.job_id = job_id
        self.types = types
        self.last_sent = last_sent
        """The highest seq queued for this client (what the stream need not send again)."""
        self.delivered = last_sent
        """The highest seq actually handed to the connection: where a closed client resumes."""
        self.max_events = services.settings.ws_max_message_events
        self.max_bytes = services.settings.ws_max_message_bytes
        self.history: EventHistory | None = services.history if job_id is not None else None
        self.violation: tuple[int, str] | None = None
        """Set when the client broke the protocol: the close code and reason."""

    async def send(self, items: list[Item]) -> None:
        """Send encoded events, at most ``ws_max_message_events`` and ``ws_max_message_bytes``
        a message (a single larger event goes alone).

        A message the client does not take within ``ws_send_timeout`` gets it marked too slow
        by the hub (its stream is cancelled): how many other clients there are or whether it
        is replaying does not matter, a client that never reads is let go in bounded time.
        """
        client = self.client
        for chunk in _messages(items, self.max_events, self.max_bytes):
            client.send_started = time.monotonic()
            try:
                await self.websocket.send_text(_message(chunk))
            finally:
                client.send_started = None
            self.delivered = max(self.delivered, chunk[-1][1])

    async def _send_history(self, encoded: list[Item]) -> None:
        """Send stored events; a client that holds this send up is slow, and its live drops
        count as lag (a client that never reads must not stay open by asking for history)."""
        client = self.client
        client.replaying = False
        try:
            await self.send(encoded)
        finally:
            client.replaying = True
        client.progressed()

    async def replay(self, job_id: str, after_seq: int, upto: int) -> None:
        """Send the stored events in ``(after_seq, upto]``, in pages."""
        history = self.history
        if history is None or upto <= after_seq:
            return
        if not await history.wait_for(job_id, upto):
            logger.warning("event store behind for job %s; replay may show a gap", job_id)
        cursor = after_seq
        while cursor < upto:
            events = await history.read(
                job_id, after_seq=cursor, types=self.types, limit=self.max_events
            )
            events = [e for e in events if e.seq <= upto]
            if not events:
                break
            await self._send_history([(job_id, e.seq, encode_event(e)) for e in events])
            cursor = events[-1].seq
            self.last_sent = max(self.last_sent, cursor)
            if len(events) < self.max_events:
                break
        if self.types is None and self.last_sent < upto:
            # the store did not have everything: say so rather than skip it silently
            notice = gap_notice(
                job_id, self.last_sent + 1, upto, upto - self.last_sent, "event_store"
            )
            await self.send([notice])
        self.last_sent = max(self.last_sent, upto)

    async def live(self) -> None:
        client = self.client
        while True:
            await client.wait()
            if client.too_slow or client.closed:
                return
            missed, items = client.take(self.max_events)
            encoded: list[Item] = []
            if missed:
                client.replaying = self.history is not None
                try:
                    for job_id, from_seq, to_seq, count in missed:
                        encoded.extend(await self._refill(job_id, from_seq, to_seq, count))
                finally:
                    client.replaying = False
            if items and self.job_id is not None:
                items = await self._in_sequence(self.job_id, items)
            encoded.extend(items)
            if encoded:
                await self.send(encoded)

    async def _in_sequence(self, job_id: str, items: list[Item]) -> list[Item]:
        """A job's buffered events (in seq order) less those already sent (replay, refill).

        Every seq of a job goes out once and in order: where the next events do not follow
        the last one sent without a hole, and no drop accounts for it, the stream sends that
        stretch from the store instead (never a silent skip)."""
        last = self.last_sent
        if items[0][1] <= last:
            items = [item for item in items if item[1] > last]
            if not items:
                return items
        first, newest = items[0][1], items[-1][1]
        hole = first != last + 1 or newest - first + 1 != len(items)
        if hole and self.types is None and self.history is not None:
            logger.warning(
                "stream of job %s: seqs %d..%d reached it with a hole after %d; "
                "sending them from the store",
                job_id,
                first,
                newest,
                last,
            )
            return await self._refill(job_id, last + 1, newest, newest - last)
        self.last_sent = newest
        return items

    async def _refill(self, job_id: str, from_seq: int, to_seq: int, count: int) -> list[Item]:
        """Events this client's buffer dropped: from the store when possible, else a gap."""
        if self.history is None:
            return [gap_notice(job_id, from_seq, to_seq, count, "websocket")]
        start = max(from_seq - 1, self.last_sent)
        if to_seq <= start:
            return []
        await self.history.wait_for(job_id, to_seq)
        events = await self.history.read(
            job_id, after_seq=start, types=self.types, limit=to_seq - start
        )
        events = [e for e in events if e.seq <= to_seq]
        encoded = [(job_id, e.seq, encode_event(e)) for e in events]
        have = events[-1].seq if events else start
        if self.types is None and have < to_seq:
            encoded.append(gap_notice(job_id, have + 1, to_seq, to_seq - have, "websocket"))
        self.last_sent = max(self.last_sent, to_seq)
        return encoded


async def _serve(
    websocket: WebSocket, job_id: str | None, after_seq: int, types_raw: str | None
) -> None:
    try:
        services = services_of(websocket)
    except Exception:
        await _refuse(websocket, 503, "the server is starting; retry in a moment")
        return
    try:
        types = _parse_types(types_raw)
    except UnknownEventName as error:
        await _refuse(websocket, 422, str(error))
        return
    if job_id is not None and not await has_events(services, job_id):
        await _refuse(websocket, 404, f"job {job_id!r} does not exist: list jobs with GET /jobs")
        return
    if services.shutting_down:
        await _refuse(websocket, 503, "the server is shutting down")
        return
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered_subprotocols(websocket) else None
    settings = services.settings
    cancel = anyio.CancelScope()
    client = services.hub.add(
        job_id=job_id,
        types=types,
        buffer_size=settings.ws_buffer_size,
        max_lag=settings.ws_max_lag,
    )
    client.on_too_slow.append(cancel.cancel)
    client.on_end.append(cancel.cancel)
    if job_id is not None and not await has_events(services, job_id):
        # deleted while this stream was being set up, before the hub knew of it
        client.end(CLOSE_JOB_DELETED, "job deleted")
    stream = _Stream(websocket, services, client, job_id, types, after_seq)
    try:
        await websocket.accept(subprotocol=subprotocol)
        upto = services.bus.last_seq(job_id) if job_id is not None else 0
        async with anyio.create_task_group() as group:

            async def watch_client() -> None:
                message = await websocket.receive()
                if message["type"] == "websocket.receive":
                    stream.violation = (
                        (CLOSE_UNSUPPORTED_DATA, "this stream takes no binary messages")
                        if message.get("bytes") is not None
                        else (CLOSE_POLICY, "this stream takes no messages; it only sends events")
                    )
                group.cancel_scope.cancel()

            group.start_soon(watch_client)
            with cancel:
                if job_id is not None:
                    client.replaying = stream.history is not None
                    await stream.replay(job_id, after_seq, upto)
                    client.replaying = False
                await stream.live()
            group.cancel_scope.cancel()
    except (WebSocketDisconnect, OSError):
        return
    except BaseExceptionGroup as group:  # the same, raised while the task group was open
        if group.split((WebSocketDisconnect, OSError))[1] is not None:
            raise
        logger.debug("a WebSocket client of %s went away mid-stream", job_id or "every job")
        return
    finally:
        services.hub.remove(client)
    if (
        websocket.application_state is not WebSocketState.CONNECTED
        or websocket.client_state is not WebSocketState.CONNECTED
    ):
        return
    if stream.violation is not None:
        code, reason = stream.violation
    elif client.ended is not None:
        code, reason = client.ended
    elif client.too_slow:
        code, reason = (
            CLOSE_TOO_SLOW,
            (
                f"too slow; resume with after_seq={stream.delivered}"
                if job_id is not None
                else "too slow; reconnect"
            ),
        )
    else:
        code, reason = CLOSE_GOING_AWAY, "the server is shutting down"
    with anyio.move_on_after(settings.ws_close_timeout):
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
            await websocket.close(code, reason)


MAX_AFTER_SEQ = 2**62


def query_problem(websocket: WebSocket, known: frozenset[str]) -> str | None:
    """What is wrong with a stream's query, as HTTP routes would say it (None: nothing).

    Checked here rather than by FastAPI, whose refusal of a WebSocket query is a bare 403.
    """
    unknown = sorted(set(websocket.query_params) - known)
    if unknown:
        return (
            f"unknown query parameter {', '.join(map(repr, unknown[:5]))}; this stream takes "
            f"{', '.join(sorted(known))}"
        )
    raw = websocket.query_params.get("after_seq")
    if raw is not None and not (raw.isascii() and raw.isdigit() and int(raw) <= MAX_AFTER_SEQ):
        return f"after_seq must be a whole number from 0 to {MAX_AFTER_SEQ}, not {raw[:20]!r}"
    return None


@router.websocket("/jobs/{job_id}/events/ws", name="job_events_ws")
async def job_events_ws(
    websocket: WebSocket,
    job_id: str = Path(pattern=JOB_ID_PATTERN),
    after_seq: str | None = Query(None),
    types: str | None = Query(None),
) -> None:
    """Stream one job's events: stored ones after ``after_seq``, then live ones."""
    problem = query_problem(websocket, frozenset({"after_seq", "types"}))
    if problem is not None:
        await _refuse(websocket, 422, problem)
        return
    await _serve(websocket, job_id, int(after_seq or 0), types)


@router.websocket("/events/ws", name="events_ws")
async def events_ws(
    websocket: WebSocket,
    types: str | None = Query(None),
    after_seq: str | None = Query(None),
) -> None:
    """Stream the live events of every job, from the moment of connecting.

    No replay: ``seq`` is per job, so one cursor cannot say where to resume, and this stream
    does not pretend to. ``after_seq`` is refused (422); to miss nothing, follow each job on
    ``/jobs/{job_id}/events/ws?after_seq=<last seq seen>``.
    """
    problem = query_problem(websocket, frozenset({"types"}))
    if problem is not None and after_seq is None:  # after_seq gets its own answer below
        await _refuse(websocket, 422, problem)
        return
    if after_seq is not None:
        await _refuse(
            websocket,
            422,
            "/events/ws streams live events only and takes no after_seq; to resume without "
            "missing events, follow each job on /jobs/{job_id}/events/ws?after_seq=<last seq>",
        )
        return
    await _serve(websocket, None, 0, types)
