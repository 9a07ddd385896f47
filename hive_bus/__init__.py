"""hive-bus: a distributed task bus over NATS JetStream for LLM prompts and custom Python jobs."""

from ._bus import Bus, open_bus
from ._client import Accepted, Hive, PartialSubmit, connect, validate
from ._errors import (
    BusConfigError,
    BusRefused,
    BusUnavailable,
    FailNow,
    HiveError,
    KeyRejected,
    ProviderError,
    QueueFull,
    RetryAfter,
    RetryLater,
    TaskNotFound,
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
from ._names import Names
from ._providers import FunctionProvider, Output, Provider, load_handler
from ._settings import Settings, SettingsError, load_settings
from ._stats import ProviderStats
from ._version import __version__
from ._worker import ProviderKey, Worker, WorkerOptions

__all__ = [
    "Accepted",
    "Bus",
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
    "Names",
    "Output",
    "Params",
    "PartialSubmit",
    "Provider",
    "ProviderError",
    "ProviderKey",
    "ProviderStats",
    "QueueFull",
    "Queued",
    "RetryAfter",
    "RetryLater",
    "Retrying",
    "Running",
    "Settings",
    "SettingsError",
    "Task",
    "TaskEvent",
    "TaskNotFound",
    "TaskRequest",
    "TaskStatus",
    "TaskView",
    "Usage",
    "Worker",
    "WorkerBeat",
    "WorkerOptions",
    "__version__",
    "connect",
    "load_handler",
    "load_settings",
    "open_bus",
    "validate",
]
