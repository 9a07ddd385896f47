"""The bus itself, for code that works below the client: the gateway, tools, tests, benchmarks.

Most users need only :func:`hive_bus.connect` (submit, wait, follow) and ``hive worker``. This module is
for code that opens the NATS connection and the bus objects on its own (:func:`open_bus` gives a
:class:`Bus`), for instance to run a :class:`hive_bus.Worker` in its own process, and for the names of
every subject, stream and bucket (:class:`Names`).
"""

from ._bus import Bus, open_bus
from ._names import Names

__all__ = ["Bus", "Names", "open_bus"]
