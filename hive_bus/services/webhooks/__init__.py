"""Webhooks: a task's end (and, gateway-wide, every task's) announced to an HTTP receiver, signed as the
Standard Webhooks spec says, delivered from the bus at least once with retries for hours.

``config`` (settings, the signer), ``urls`` (where a webhook may go), ``source`` (the one reader of
the events stream), ``records`` (the queue and the delivery log on the bus), ``payload`` (the body and its id), ``dispatch`` (queueing
and delivering), ``api`` (the submission check and ``GET /v1/webhooks/deliveries``).
"""

from .config import Endpoint, Signer, WebhookConfigError, WebhookSettings, load_webhook_settings
from .dispatch import Webhooks

__all__ = ["Endpoint", "Signer", "WebhookConfigError", "WebhookSettings", "Webhooks", "load_webhook_settings"]
