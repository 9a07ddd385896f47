"""Services that run beside the bus: the HTTP gateway."""
