"""Where an agent turn's steps are kept, and the user's approvals.

`DatabaseSteps` saves each step as an `AgentStep` of the answer's message as
it happens (the chat shows steps live and again on reload), and waits for an
*ask* step's decision by reading it back from the database, so the pause
survives a reload and any server process may record the decision
(`decide`). `MemorySteps` keeps an HTTP API turn's steps in memory, to return
them with the answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from django.db import transaction

from channels.db import database_sync_to_async

from agents import limits
from agents.loop import Step
from agents.models import AgentStep

Status = AgentStep.Status


# What came of a step: the same names on the loop's `Step` and on its `AgentStep`
# row, which is saved again with them as the step goes on.
OUTCOME = ("status", "result", "error", "duration_ms", "sources")

# While a turn waits (for a tool, or for the user's approval) no text is saved;
# its message is touched this often so that it never looks like an answer a
# dead server left behind (chat.services.settle_interrupted: 120 s).
KEEPALIVE_SECONDS = 10.0


def _touch(message_id: int) -> None:
    """Mark the answer's message as alive (`chat.Message`, reached through the
    step's foreign key: agents does not import chat)."""
    from django.utils import timezone

    message_model = AgentStep._meta.get_field("message").related_model
    message_model.objects.filter(pk=message_id).update(updated_at=timezone.now())


class DatabaseSteps:
    def __init__(self, message_id: int) -> None:
        self.message_id = message_id

    async def started(self, step: Step) -> None:
        await database_sync_to_async(self._save)(step)

    async def finished(self, step: Step) -> None:
        await database_sync_to_async(self._save)(step)

    def _save(self, step: Step) -> None:
        fields = {name: getattr(step, name) for name in OUTCOME}
        if step.id is None:
            row = AgentStep.objects.create(
                message_id=self.message_id,
                round=step.round,
                position=step.position,
                call_id=step.call_id[:128],
                tool=step.name[:200],
                arguments=step.arguments,
                **fields,
            )
            step.id = row.pk
        else:
            AgentStep.objects.filter(pk=step.id).update(**fields)
        _touch(self.message_id)

    async def decision(self, step: Step, wait_seconds: float) -> bool | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        touched = loop.time()
        while True:
            approved = await database_sync_to_async(_decision_of)(step.id)
            if approved is not None:
                return approved
            if loop.time() - touched >= KEEPALIVE_SECONDS:
                await database_sync_to_async(_touch)(self.message_id)
                touched = loop.time()
            left = deadline - loop.time()
            if left <= 0:
                # Expired: a late click finds the step no longer awaiting.
                await database_sync_to_async(_expire)(step.id)
                return await database_sync_to_async(_decision_of)(step.id)
            await asyncio.sleep(min(limits.APPROVAL_POLL_SECONDS, left))


def _decision_of(step_id: int) -> bool | None:
    return AgentStep.objects.filter(pk=step_id).values_list("approved", flat=True).first()


def _expire(step_id: int) -> None:
    AgentStep.objects.filter(
        pk=step_id, status=Status.AWAITING_APPROVAL, approved__isnull=True
    ).update(status=Status.DENIED, error="Nobody approved this call in time; it was not run.")


class MemorySteps:
    """Steps kept for the answer of an HTTP request (no one to ask: *ask*
    tools are not offered there)."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    async def started(self, step: Step) -> None:
        if step not in self.steps:
            self.steps.append(step)

    async def finished(self, step: Step) -> None:
        await self.started(step)

    async def decision(self, step: Step, wait_seconds: float) -> bool | None:
        return False


def decide(user, step_id: int, approved: bool) -> bool:
    """Record the user's decision on one of their steps that awaits approval.
    False when there is no such step of theirs waiting (decided, expired,
    another user's, or none)."""
    with transaction.atomic():
        updated = AgentStep.objects.filter(
            pk=step_id,
            status=Status.AWAITING_APPROVAL,
            approved__isnull=True,
            message__conversation__owner=user,
        ).update(approved=approved)
    return bool(updated)


def step_dict(row: AgentStep) -> dict[str, Any]:
    """A saved step as the live one was sent (`Step.as_dict`): one shape, live or reloaded."""
    outcome = {name: getattr(row, name) for name in OUTCOME}
    step = Step(row.round, row.position, row.call_id, row.tool, row.arguments, id=row.pk, **outcome)
    return step.as_dict()


def steps_of(message_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """The saved steps of these messages, in order, by message id."""
    found: dict[int, list[dict[str, Any]]] = {}
    for row in AgentStep.objects.filter(message_id__in=message_ids).order_by(
        "message_id", "round", "position"
    ):
        found.setdefault(row.message_id, []).append(step_dict(row))
    return found


def settle_unfinished(message_id: int) -> None:
    """Steps of an answer that ended while they ran (stop, failure) are
    marked cancelled, so none is left looking live."""
    AgentStep.objects.filter(
        message_id=message_id, status__in=[Status.RUNNING, Status.AWAITING_APPROVAL]
    ).update(status=Status.CANCELLED, error="The answer ended before this call finished.")


def agent_mode(conversation_id: int) -> bool:
    from agents.models import ConversationAgent

    return bool(
        ConversationAgent.objects.filter(conversation_id=conversation_id)
        .values_list("enabled", flat=True)
        .first()
    )


def set_agent_mode(conversation_id: int, enabled: bool) -> None:
    from agents.models import ConversationAgent

    ConversationAgent.objects.update_or_create(
        conversation_id=conversation_id, defaults={"enabled": enabled}
    )
