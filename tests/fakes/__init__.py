"""Loopback fakes of the LLM providers' HTTP APIs, for testing the real SDKs without the network.

``ProviderFakes`` serves Gemini, Groq, Anthropic and an OpenAI-compatible server on one
``http://127.0.0.1:PORT``; each answers with its real success bodies, 429 bodies and headers, and error
bodies, and streams a request that asks for it with its own Server-Sent Events; each has a
:class:`ProviderState` to set limits, failures and stream pauses, and read counters::

    with ProviderFakes() as fakes:
        fakes.groq.limit(2, window_s=1.0)
        client = groq.AsyncGroq(api_key="k", base_url=fakes.groq_base_url, max_retries=0)
"""

from ._common import go_duration, reply_text, words
from ._server import ProviderFakes
from ._state import DAY_S, ProviderState

__all__ = ["DAY_S", "ProviderFakes", "ProviderState", "go_duration", "reply_text", "words"]
