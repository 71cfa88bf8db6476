"""The limits of an agent turn, defined once.

Admins tune the step cap, time limits and URL fetching in the admin
(`AgentSettings`, one row); the values here are the bounds those settings
must stay within and the limits nobody tunes. The frames, the API schema,
the docs and the tests read them from here.
"""

from __future__ import annotations

DEFAULT_MAX_STEPS = 8
"""Model rounds that may call tools in one turn (admin setting `max_steps`)."""

MAX_STEPS_RANGE = (1, 50)

DEFAULT_STEP_TIMEOUT_SECONDS = 30.0
"""One tool call's time limit (admin setting); a call past it is an error result."""

DEFAULT_TURN_TIMEOUT_SECONDS = 300.0
"""The whole agent turn's time limit (admin setting), tools and model rounds together."""

DEFAULT_APPROVAL_TIMEOUT_SECONDS = 600.0
"""How long an *ask* tool waits for the user's decision before it counts as denied."""

MAX_PARALLEL_CALLS = 8
"""Tool calls of one model round run at once; more in one round are error results."""

MAX_RESULT_CHARS = 8000
"""A tool result is cut to this before the model sees it (and before it is saved)."""

MAX_ARGUMENT_CHARS = 16_000
"""A tool call's JSON arguments longer than this are refused as an error result."""

APPROVAL_POLL_SECONDS = 0.25
"""How often a paused turn reads its approval from the database (any process may decide)."""

# ---- the calculator ----

CALC_MAX_EXPRESSION_CHARS = 500
CALC_MAX_EXPONENT = 1000
"""`a ** b` with |b| above this is refused (2 ** 1000 has 302 digits)."""
CALC_MAX_DIGITS = 400
"""An integer result or operand longer than this is refused."""

# ---- fetch URL (off by default) ----

DEFAULT_FETCH_MAX_BYTES = 512 * 1024
DEFAULT_FETCH_TIMEOUT_SECONDS = 10.0
FETCH_MAX_REDIRECTS = 3

# ---- MCP ----

MCP_LIST_TIMEOUT_SECONDS = 10.0
"""Listing one MCP server's tools; a server slower than this counts as down."""

MCP_STATUS_TTL_SECONDS = 30.0
"""A server's tool list is reused this long before it is listed again."""

MAX_MCP_HEADER_CHARS = 4000
