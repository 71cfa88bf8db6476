"""Fixtures of the agent tests: a runner with the `agent` capability in front
of the scripted server, and the agent settings a test wants."""

from __future__ import annotations

import pytest

from tests.support.fixtures import runner_config


@pytest.fixture
def agent_runner(scripted_server):
    return runner_config(
        scripted_server.url, "scripted", priority=10, timeout_seconds=10, enable_agents=True
    )


@pytest.fixture
def agent_settings(db):
    """The one AgentSettings row; tests change its fields and save."""
    from agents.models import AgentSettings

    return AgentSettings.objects.create()


@pytest.fixture(autouse=True)
def _fresh_mcp_listings():
    from agents import mcp

    mcp.forget_listings()
    yield
    mcp.forget_listings()
