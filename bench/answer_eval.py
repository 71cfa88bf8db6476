"""Grounded answers from the default local runner (issue 22), before and after.

    .venv/bin/python bench/answer_eval.py [--configs before,after] [--limit N]

Twelve short fictional fact sheets (bench/evalsets/answer_eval_sheets.toml; so no
model can answer from memory), all uploaded together into one collection, so
retrieval returns the other sheets as distractors; 48 questions whose answer is
in exactly one sheet and 10 whose answer is in none. Each question is one real
chat turn through `chat.pipeline.run_turn` (guardian, hybrid retrieval, router,
the local runner), pinned to an `executorch` runner on the prepared model, with the
default config's temperature (0.7) and a fixed seed per question (so a rerun
gives the same answers).

Configurations:
  before  the prompt and runner as they were before issue 22: the sources in
          the system prompt ("Answer using the context below ..."), sampling
          with temperature only (no top_k / top_p / penalties), no loop guard
  after   the grounded prompt of chat.pipeline (sources before the question,
          "answer only from them, cite [n], else say ..."), the local
          runner's default sampling (top_k 40, top_p 0.9, repetition penalty
          1.1) and the loop guard

Reported per configuration: answers that contain the fact; answers that mix
in another sheet's fact of the same kind (another builder, year, ...);
unanswerable questions answered as such ("not in the documents" and similar);
answers that loop (stopped by the guard, or a repeating tail found afterwards
with the guard's own detector); answers that cite a source; mean length.
Runs in a throw-away DATA_DIR (embedded Chroma, SQLite); the model is the one
`prepare_model` put in MODELS_DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time
from dataclasses import dataclass

from _common import evaluation_set, setup_django

setup_django("answers", models=True)


@dataclass(frozen=True)
class Sheet:
    filename: str
    text: str
    # (question, kind, accepted answers)
    questions: tuple[tuple[str, str, tuple[str, ...]], ...]


_DATA = evaluation_set("answer_eval_sheets")
SHEETS = tuple(
    Sheet(
        sheet["filename"], sheet["text"], tuple((q, k, tuple(a)) for q, k, a in sheet["questions"])
    )
    for sheet in _DATA["sheet"]
)
UNANSWERABLE = tuple(_DATA["unanswerable"])

NOT_IN_DOCS = re.compile(
    r"(do(es)? not (contain|say|mention|provide|include|state|specify|have)|"
    r"not (mentioned|stated|specified|provided|included|given|found|in the (documents|sources))|"
    r"no (information|mention|details?)|(don't|do not|doesn't|cannot|can't) (know|find|tell)|"
    r"unable to (find|answer|determine)|not available)",
    re.IGNORECASE,
)


def _contains(text: str, answers: tuple[str, ...]) -> bool:
    low = text.lower()
    return any(a.lower() in low for a in answers)


def questions() -> list[dict]:
    out = []
    for sheet in SHEETS:
        for question, kind, answers in sheet.questions:
            others = tuple(
                a
                for other in SHEETS
                if other is not sheet
                for q, k, answers_of in other.questions
                if k == kind
                for a in answers_of
                if not _contains(" ".join(answers), (a,))
            )
            out.append(
                {"q": question, "sheet": sheet.filename, "answers": answers, "others": others}
            )
    out += [{"q": q, "sheet": None, "answers": (), "others": ()} for q in UNANSWERABLE]
    return out


# ---- the "before" prompt (chat.pipeline before issue 22) -------------------------------

_OLD_RAG_INSTRUCTIONS = (
    "Answer using the context below when it is relevant, and cite sources by "
    "their number like [1]. If the context does not contain the answer, say so.\n\n"
    "Context:\n"
)


def _old_fit_to_budget(request, runner, context=""):
    from dataclasses import replace

    from chat import pipeline
    from runners.base import ChatMessage

    fitted, notices = pipeline.NEW_FIT(request, runner, "")
    if not context:
        return fitted, notices
    system = ChatMessage("system", f"{pipeline.SYSTEM_PROMPT}\n\n{_OLD_RAG_INSTRUCTIONS}{context}")
    return replace(fitted, messages=(system, *fitted.messages[1:])), notices


def _prompt_after_question(question: str, context: str) -> str:
    return (
        f"Sources:\n{context}\n\nQuestion: {question}\n\nAnswer the question in one "
        "sentence using only the sources above, and cite the source like [1]. If the sources "
        'do not answer it, reply exactly: "The documents do not contain the answer."'
    )


def _prompt_short(question: str, context: str) -> str:
    return (
        f"{context}\n\nUse only the text above. If it does not answer the question, say "
        f'"The documents do not contain the answer." Cite like [1].\n\nQuestion: {question}'
    )


_EXAMPLE = (
    "Example.\nSources:\n[1] mill.md: The Blue Mill was built by Ada Lorne in 1820.\n"
    "Question: Who built the Blue Mill?\nAnswer: Ada Lorne built the Blue Mill [1].\n"
    "Question: What colour is the roof of the Blue Mill?\n"
    "Answer: The documents do not contain the answer.\n\n"
)


def _prompt_fewshot(question: str, context: str) -> str:
    from chat.pipeline import RAG_INSTRUCTIONS

    return (
        f"{_EXAMPLE}Now answer from these sources.\nSources:\n{context}\n\n"
        f"{RAG_INSTRUCTIONS}\n\nQuestion: {question}\nAnswer:"
    )


CONFIGS = {
    "before": {
        "extra": {"repetition_penalty": 1.0, "top_k": 0, "top_p": 1.0, "loop_guard": False},
        "old_prompt": True,
        "grounded_temperature": None,
    },
    "after": {"extra": {}},
    # Variants explored while designing the prompt (not the default setup).
    "after-t0.7": {"extra": {}, "grounded_temperature": None},
    "after-k2": {"extra": {}, "k": 2},
    "after-q-first": {"extra": {}, "prompt": _prompt_after_question},
    "after-short": {"extra": {}, "prompt": _prompt_short},
    "after-fewshot": {"extra": {}, "prompt": _prompt_fewshot},
}


def setup_documents():
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from rag.ingestion import ingest_document
    from rag.models import Collection
    from rag.uploads import add_document, stage_chunks

    user = get_user_model().objects.create_user("eval")
    collection = Collection.personal_for(user)
    for sheet in SHEETS:
        document = add_document(
            user, collection, stage_chunks([sheet.text.encode()], sheet.filename), dispatch=False
        )
        assert ingest_document(document.pk).status == "ready", sheet.filename
    return user, collection


async def answer(user, collection, question: str, seed: int, config_name: str) -> dict:
    from channels.db import database_sync_to_async

    from chat.pipeline import Sources, TurnInput, run_turn
    from runners.base import ChatMessage, Done, Notice, TokenDelta
    from runners.models import RunnerConfig

    @database_sync_to_async
    def set_seed() -> None:
        config = RunnerConfig.objects.get(name="local")
        config.extra_params = {**CONFIGS[config_name]["extra"], "seed": seed}
        config.save()

    await set_seed()
    text, done, notices, sources = "", None, [], ()
    started = time.perf_counter()
    async for event in run_turn(
        TurnInput(
            user=user,
            messages=(ChatMessage("user", question),),
            rag=True,
            collection_ids=(collection.pk,),
            pinned_runner="local",
        )
    ):
        if isinstance(event, TokenDelta):
            text += event.text
        elif isinstance(event, Done):
            done = event
        elif isinstance(event, Notice):
            notices.append(event.code)
        elif isinstance(event, Sources):
            sources = event.sources
    return {
        "text": text,
        "finish": done.finish_reason if done else "",
        "notices": notices,
        "sources": [s["title"] for s in sources],
        "seconds": time.perf_counter() - started,
        "tokens": done.usage.completion_tokens if done else 0,
    }


def score(items: list[dict], results: list[dict]) -> dict:
    from runners.loopguard import LoopSettings, find_cycle

    grounded = [(i, r) for i, r in zip(items, results, strict=True) if i["sheet"]]
    unanswerable = [(i, r) for i, r in zip(items, results, strict=True) if not i["sheet"]]
    loops = sum(
        1 for r in results if r["finish"] == "loop" or find_cycle(r["text"], LoopSettings())
    )
    return {
        "contains_fact": sum(_contains(r["text"], i["answers"]) for i, r in grounded),
        "grounded": len(grounded),
        "mixes_other": sum(_contains(r["text"], i["others"]) for i, r in grounded),
        "says_not_in_docs": sum(bool(NOT_IN_DOCS.search(r["text"])) for _, r in unanswerable),
        "false_not_in_docs": sum(
            bool(NOT_IN_DOCS.search(r["text"])) and not _contains(r["text"], i["answers"])
            for i, r in grounded
        ),
        "unanswerable": len(unanswerable),
        "loops": loops,
        "cites": sum(bool(re.search(r"\[\d+\]", r["text"])) for r in results),
        "mean_chars": round(statistics.mean(len(r["text"]) for r in results)),
        "mean_tokens": round(statistics.mean(r["tokens"] for r in results), 1),
        "mean_seconds": round(statistics.mean(r["seconds"] for r in results), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="before,after")
    parser.add_argument("--limit", type=int, default=0, help="first N questions only")
    parser.add_argument("--show", action="store_true", help="print every answer")
    args = parser.parse_args()

    from chat import pipeline
    from runners.models import RunnerConfig

    pipeline.NEW_FIT = pipeline.fit_to_budget
    import rag.retrieval

    real_retrieve = rag.retrieval.retrieve
    real_prompt = pipeline.grounded_question
    real_temperature = pipeline.GROUNDED_TEMPERATURE
    user, collection = setup_documents()
    RunnerConfig.objects.create(
        name="local", kind="executorch", temperature=0.7, max_tokens=256, priority=10
    )
    items = questions()
    if args.limit:
        items = items[: args.limit] + [i for i in items if not i["sheet"]][: args.limit // 4]
    print(f"{len(SHEETS)} sheets in one collection; {len(items)} questions")
    rows = {}
    for name in args.configs.split(","):
        config = CONFIGS[name]
        pipeline.fit_to_budget = (
            _old_fit_to_budget if config.get("old_prompt") else pipeline.NEW_FIT
        )
        pipeline.grounded_question = config.get("prompt", real_prompt)
        pipeline.GROUNDED_TEMPERATURE = config.get("grounded_temperature", real_temperature)
        k = CONFIGS[name].get("k")
        rag.retrieval.retrieve = (
            (lambda *a, _k=k, **kw: real_retrieve(*a, **{**kw, "k": _k})) if k else real_retrieve
        )
        results = [
            asyncio.run(answer(user, collection, item["q"], seed, name))
            for seed, item in enumerate(items)
        ]
        if args.show:
            for item, result in zip(items, results, strict=True):
                print(f"--- [{name}] {item['q']} ({result['finish']})\n{result['text']}")
        rows[name] = score(items, results)
        print(name, rows[name], flush=True)
    print()
    print(
        "| config | contains the fact | mixes another sheet's fact | unanswerable said so | "
        "loops | cites [n] | mean length (chars / tokens) | s per answer |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['contains_fact']}/{r['grounded']} | {r['mixes_other']}/{r['grounded']} "
            f"| {r['says_not_in_docs']}/{r['unanswerable']} | {r['loops']} | "
            f"{r['cites']}/{r['grounded'] + r['unanswerable']} | {r['mean_chars']} / "
            f"{r['mean_tokens']} | {r['mean_seconds']} |"
        )


if __name__ == "__main__":
    main()
