"""The trainbus event bus: events, delivery policies, subscribers, control and callbacks, and
the vocabulary every layer shares (job states, monitor modes, ``Stateful``).

``bus`` imports nothing else of the project.
"""

from __future__ import annotations

from ._bus import EventBus as EventBus
from ._callbacks import Callback as Callback
from ._callbacks import CallbackRegistry as CallbackRegistry
from ._control import CONTROLLER_SOURCES as CONTROLLER_SOURCES
from ._control import SHUTDOWN_SOURCE as SHUTDOWN_SOURCE
from ._control import Command as Command
from ._control import CommandKind as CommandKind
from ._control import ControlChannel as ControlChannel
from ._delivery import BusStatistics as BusStatistics
from ._delivery import DeliveryPolicy as DeliveryPolicy
from ._delivery import SubscriptionStatistics as SubscriptionStatistics
from ._errors import BusClosed as BusClosed
from ._errors import BusError as BusError
from ._errors import ControlError as ControlError
from ._errors import UnknownEventName as UnknownEventName
from ._errors import WouldBlock as WouldBlock
from ._events import BATCH_EVENT_TYPES as BATCH_EVENT_TYPES
from ._events import CALLBACK_EVENT_TYPES as CALLBACK_EVENT_TYPES
from ._events import Event as Event
from ._events import EventType as EventType
from ._events import event_type_for as event_type_for
from ._job_states import ENDED_STATES as ENDED_STATES
from ._job_states import TERMINAL_JOB_EVENT_TYPES as TERMINAL_JOB_EVENT_TYPES
from ._job_states import JobState as JobState
from ._monitor_mode import MODE_BETTER as MODE_BETTER
from ._monitor_mode import Mode as Mode
from ._monitor_mode import improves as improves
from ._stateful import Stateful as Stateful
from ._subscriber import Subscriber as Subscriber
from ._subscriber import SubscriberHandle as SubscriberHandle
from ._subscription import Subscription as Subscription

__all__ = [
    "BATCH_EVENT_TYPES",
    "CALLBACK_EVENT_TYPES",
    "CONTROLLER_SOURCES",
    "ENDED_STATES",
    "MODE_BETTER",
    "SHUTDOWN_SOURCE",
    "TERMINAL_JOB_EVENT_TYPES",
    "BusClosed",
    "BusError",
    "BusStatistics",
    "Callback",
    "CallbackRegistry",
    "Command",
    "CommandKind",
    "ControlChannel",
    "ControlError",
    "DeliveryPolicy",
    "Event",
    "EventBus",
    "EventType",
    "JobState",
    "Mode",
    "Stateful",
    "Subscriber",
    "SubscriberHandle",
    "Subscription",
    "SubscriptionStatistics",
    "UnknownEventName",
    "WouldBlock",
    "event_type_for",
    "improves",
]
