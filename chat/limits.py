"""The limits on what one chat turn may carry, defined once.

The websocket frames, the HTTP request models, the OpenAPI document, the docs
and the fuzz suites all read these; nothing else spells a number. Limits that
operators tune per deployment (sizes in bytes, rates) are settings and are
read here from django.conf.settings, so there is still one name for each.
"""

from __future__ import annotations

from runners.base import SAMPLING_BOUNDS as SAMPLING_BOUNDS  # re-exported: a limit too

MAX_TEXT_CHARS = 100_000
"""Characters in one message's text (a user turn, or any message sent to /v1)."""

MAX_IMAGES = 4
"""Images attached to one message (a websocket user turn, a /v1 user message)."""

MAX_MESSAGES = 1000
"""Messages in one /v1 request (the websocket sends one turn at a time)."""

MAX_TOKENS = 32_768
"""Largest `max_tokens` a caller may ask for, on the websocket and on /v1 alike;
a runner may allow fewer."""

MAX_STOP_SEQUENCES = 4
"""Stop strings in one request."""

MAX_TOOLS = 128
"""Tool definitions in one request."""

MAX_COLLECTIONS = 100
"""Document collections named in one request."""

MAX_REQUEST_ID_CHARS = 128
"""Length of a websocket frame's `request_id`."""

MAX_TIMEZONE_CHARS = 64
"""Length of a frame's `timezone` (an IANA name such as Europe/Paris)."""

MAX_ATTACHED_PER_SOCKET = 10
"""Answers one websocket may follow at once through `attach` (chat/live.py); an
attach to an answer that has ended does not count."""

MAX_RUNNER_NAME_CHARS = 100
"""Length of a runner name (RunnerConfig.name is a slug of at most 100)."""

TITLE_MAX_CHARS = 60
"""A conversation title made from its first message is cut to this."""

MAX_TITLE_CHARS = 200
"""Longest title a caller may set (Conversation.title)."""

MAX_INSTRUCTIONS_CHARS = 20_000
"""A project's instructions (its system prompt)."""

MAX_SHARE_DAYS = 365
"""Days a share link may be set to live (`expires_in_days`); without it, until revoked."""

MAX_CONVERSATION_QUERY_CHARS = 200
"""Characters of a conversation search (`GET /api/conversations?q=`); more are cut."""

MAX_SEARCH_HITS = 50
"""Conversations a conversation search answers (the best-ranked)."""

MAX_JSON_DEPTH = 64
"""Nesting depth of a JSON body or frame; deeper is refused before any work."""

# The sampling parameters' bounds (temperature, top_p, top_k, penalties, seed)
# are the runners' own, SAMPLING_BOUNDS (runners.base), which the websocket's
# `params` and /v1's request body both declare through chat.frames.Sampling.

# ---- the HTTP APIs' request bodies (api/schemas.py declares them from these) ----

MAX_TOOL_NAME_CHARS = 64
"""Length of a tool's function name (OpenAI's limit)."""

MAX_QUERY_CHARS = 4000
"""Characters in a /api/search query."""

MAX_SEARCH_K = 50
"""Results a /api/search may ask for (`k`)."""

MAX_FILES_PER_REQUEST = 20
"""Files in one upload to /api/documents."""

MAX_DOCUMENTS_LISTED = 500
"""Documents GET /api/documents returns (the newest)."""

MAX_SMALL_BODY_BYTES = 64 * 1024
"""JSON body of the small /api requests (search, conversation rename)."""

MAX_APP_JSON_DEPTH = 32
"""Nesting depth of a JSON body under /api (bodies under /v1 may nest MAX_JSON_DEPTH,
for tools' JSON Schema `parameters`)."""

MAX_ACTIVE_KEYS = 25
"""Active API keys per user: enough for every program a person runs, a bound on
what a stolen session can mint."""
