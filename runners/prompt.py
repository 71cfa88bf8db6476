"""The one prompt trimmer: the oldest turns left out whole until a prompt fits.

`chat.pipeline.fit_to_budget` fits every request to the runner the router
chose with it (tokens counted per message), and the local runner uses it
again on its rendered chat template (exact tokens). Both tell the user with
`trimmed_notice`: code `trimmed`, `data.dropped` the turns left out
(docs/websocket.md, docs/http-api.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from runners.base import ChatMessage, Notice, NoticeCode


def drop_oldest(
    messages: Sequence[ChatMessage], fits: Callable[[list[ChatMessage]], bool]
) -> tuple[list[ChatMessage], int] | None:
    """The messages with their oldest turns left out, whole, until `fits`
    them, and how many were left out. System messages and the last message
    are never left out, and a tool result whose call was left out goes with
    it. None when even those alone do not fit."""
    kept = list(messages)
    dropped = 0
    while not fits(kept):
        droppable = [i for i, m in enumerate(kept[:-1]) if m.role != "system"]
        if not droppable:
            return None
        del kept[droppable[0]]
        dropped += 1
        # A tool result without its call would confuse the model.
        while True:
            rest = [i for i, m in enumerate(kept[:-1]) if m.role != "system"]
            if not rest or kept[rest[0]].role != "tool":
                break
            del kept[rest[0]]
            dropped += 1
    return kept, dropped


def trimmed_notice(dropped: int, runner: str, context_tokens: int) -> Notice:
    """What the user is told when `dropped` turns were left out."""
    return Notice(
        NoticeCode.TRIMMED,
        f"The {dropped} oldest message(s) were left out to fit "
        f"{runner}'s context of {context_tokens} tokens.",
        {"dropped": dropped},
    )
