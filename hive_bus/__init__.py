"""hive-bus: a distributed task bus over NATS JetStream for LLM prompts and custom Python jobs.

What is here is what users call: the client (:func:`connect`, :class:`Hive`), the wire types, the
errors, and the provider API (:class:`Provider`, :class:`Output`, the outcomes a provider raises,
:func:`register_secret`) with the worker that runs one. The bus underneath (``Bus``, ``open_bus``,
``Names``) is in :mod:`hive_bus.bus`; ``tests/test_public_api.py`` keeps ``__all__`` honest.
"""

from ._chunks import StreamingProvider
from ._client import Accepted, Hive, PartialSubmit, connect, validate
from ._errors import (
    BusConfigError,
    BusRefused,
    BusUnavailable,
    FailNow,
    HiveError,
    KeyRejected,
    NoQuota,
    ProviderError,
    QueueFull,
    Quota,
    RetryAfter,
    RetryLater,
    TaskNotFound,
    TooLarge,
)
from ._messages import (
    Completed,
    Failed,
    Params,
    Queued,
    Retrying,
    Running,
    Task,
    TaskEvent,
    TaskRequest,
    TaskStatus,
    TaskView,
    Usage,
    WorkerBeat,
)
from ._providers import FunctionProvider, Output, Provider
from ._redact import register as register_secret
from ._settings import Settings, SettingsError, load_settings
from ._stats import ProviderStats
from ._stream import StreamEnded, StreamItem, StreamRestarted, StreamText, StreamWaiting, TaskStream
from ._version import __version__
from ._worker import ProviderKey, Worker, WorkerOptions

__all__ = [
    "Accepted",
    "BusConfigError",
    "BusRefused",
    "BusUnavailable",
    "Completed",
    "FailNow",
    "Failed",
    "FunctionProvider",
    "Hive",
    "HiveError",
    "KeyRejected",
    "NoQuota",
    "Output",
    "Params",
    "PartialSubmit",
    "Provider",
    "ProviderError",
    "ProviderKey",
    "ProviderStats",
    "QueueFull",
    "Queued",
    "Quota",
    "RetryAfter",
    "RetryLater",
    "Retrying",
    "Running",
    "Settings",
    "SettingsError",
    "StreamEnded",
    "StreamItem",
    "StreamRestarted",
    "StreamText",
    "StreamWaiting",
    "StreamingProvider",
    "Task",
    "TaskEvent",
    "TaskNotFound",
    "TaskRequest",
    "TaskStatus",
    "TaskStream",
    "TaskView",
    "TooLarge",
    "Usage",
    "Worker",
    "WorkerBeat",
    "WorkerOptions",
    "__version__",
    "connect",
    "load_settings",
    "register_secret",
    "validate",
]
