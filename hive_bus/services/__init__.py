"""Services that run beside the bus: the HTTP gateway (``hive gateway``; its parts are in the modules
here, none of them an API of its own)."""

__all__: list[str] = []
