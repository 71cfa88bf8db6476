"""The limits on what one chat turn may carry, defined once.

The websocket frames, the HTTP request models, the OpenAPI document, the docs
and the fuzz suites all read these; nothing else spells a number. Limits that
operators tune per deployment (sizes in bytes, rates) are settings and are
read here from django.conf.settings, so there is still one name for each.
"""

from __future__ import annotations

MAX_TEXT_CHARS = 100_000
"""Characters in one message's text (a user turn, or any message sent to /v1)."""

MAX_IMAGES = 4
"""Images attached to one message."""

MAX_MESSAGES = 1000
"""Messages in one /v1 request (the websocket sends one turn at a time)."""

MAX_TOKENS = 32_768
"""Largest `max_tokens` a caller may ask for; a runner may allow fewer."""

MAX_STOP_SEQUENCES = 4
"""Stop strings in one request."""

MAX_TOOLS = 128
"""Tool definitions in one request."""

MAX_COLLECTIONS = 100
"""Document collections named in one request."""

MAX_REQUEST_ID_CHARS = 128
"""Length of a websocket frame's `request_id`."""

MAX_RUNNER_NAME_CHARS = 100
"""Length of a runner name (RunnerConfig.name is a slug of at most 100)."""

TITLE_MAX_CHARS = 60
"""A conversation title made from its first message is cut to this."""

MAX_TITLE_CHARS = 200
"""Longest title a caller may set (Conversation.title)."""

MAX_JSON_DEPTH = 64
"""Nesting depth of a JSON body or frame; deeper is refused before any work."""

TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)
