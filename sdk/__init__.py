"""Your own training code as a trainbus job.

::

    import trainbus.sdk

    with trainbus.sdk.init("resnet-a", epochs=10, model=model, optimizer=optimizer) as run:
        for epoch in run.epochs():
            for x, y in run.batches(loader):
                loss = step(x, y)
                run.log_batch(loss)
            run.end_epoch(train_loss=..., val_loss=..., val_accuracy=...)

The server's URL and token come from the arguments or ``TRAINBUS_URL`` and
``TRAINBUS_TOKEN``. ``docs/SDK.md`` says what each call does, and what happens when the
server is away; ``docs/PROTOCOL.md`` is the protocol the SDK and the server's own worker
processes speak. This package imports no server code.
"""

from ._attach import ServerAddress as ServerAddress
from ._batch_events import BatchEventBuffer as BatchEventBuffer
from ._bridge import ServerBridge as ServerBridge
from ._bridge import ServerRefused as ServerRefused
from ._errors import RunRefused as RunRefused
from ._errors import SDKError as SDKError
from ._errors import ServerUnreachable as ServerUnreachable
from ._protocol import CLOSE_BAD_CREDENTIAL as CLOSE_BAD_CREDENTIAL
from ._protocol import CLOSE_PROTOCOL as CLOSE_PROTOCOL
from ._protocol import CLOSE_REPLACED as CLOSE_REPLACED
from ._protocol import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from ._protocol import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._protocol import RUN_ID_PATTERN as RUN_ID_PATTERN
from ._protocol import WINDOW_EVENTS as WINDOW_EVENTS
from ._protocol import ProtocolError as ProtocolError
from ._protocol import command_from_message as command_from_message
from ._protocol import decode as decode
from ._protocol import encode as encode
from ._protocol import finite as finite
from ._protocol import to_json as to_json
from ._run import MAX_BACKLOG_EVENTS as MAX_BACKLOG_EVENTS
from ._run import Run as Run
from ._run import init as init

__all__ = [
    "CLOSE_BAD_CREDENTIAL",
    "CLOSE_PROTOCOL",
    "CLOSE_REPLACED",
    "MAX_BACKLOG_EVENTS",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "RUN_ID_PATTERN",
    "WINDOW_EVENTS",
    "BatchEventBuffer",
    "ProtocolError",
    "Run",
    "RunRefused",
    "SDKError",
    "ServerAddress",
    "ServerBridge",
    "ServerRefused",
    "ServerUnreachable",
    "command_from_message",
    "decode",
    "encode",
    "finite",
    "init",
    "to_json",
]
