"""Grounded answers from the default local runner (issue 22), before and after.

    .venv/bin/python bench/answer_eval.py [--configs before,after] [--limit N]

Twelve short fictional fact sheets (so no model can answer from memory), all
uploaded together into one collection, so retrieval returns the other sheets
as distractors; 48 questions whose answer is in exactly one sheet and 10 whose
answer is in none. Each question is one real chat turn through
`chat.pipeline.run_turn` (guardian, hybrid retrieval, router, the local
runner), pinned to an `executorch` runner on the prepared model, with the
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

from _common import setup_django

setup_django("answers", models=True)


@dataclass(frozen=True)
class Sheet:
    filename: str
    text: str
    # (question, kind, accepted answers)
    questions: tuple[tuple[str, str, tuple[str, ...]], ...]


SHEETS = (
    Sheet(
        "varnholm-lighthouse.md",
        "# Varnholm Lighthouse\n\nVarnholm Lighthouse stands on the northern cape of the "
        "island of Keswa. It was built by Ilse Varga in 1874. Its tower is 31 metres tall "
        "and its lamp was first lit with whale oil. The last keeper, Tomas Brenn, left in "
        "1961, when the light was automated.",
        (
            ("Who built Varnholm Lighthouse?", "builder", ("Ilse Varga",)),
            ("In what year was Varnholm Lighthouse built?", "year", ("1874",)),
            ("How tall is the tower of Varnholm Lighthouse?", "height", ("31",)),
            ("Who was the last keeper of Varnholm Lighthouse?", "keeper", ("Tomas Brenn",)),
        ),
    ),
    Sheet(
        "orsa-point-lighthouse.md",
        "# Orsa Point Lighthouse\n\nOrsa Point Lighthouse guards the entrance to the bay "
        "of Lummen. It was built by Margaret Ostrow in 1902. Its tower is 47 metres tall "
        "and is painted with red and white bands. The last keeper, Eda Quill, left in 1979.",
        (
            ("Who built Orsa Point Lighthouse?", "builder", ("Margaret Ostrow",)),
            ("In what year was Orsa Point Lighthouse built?", "year", ("1902",)),
            ("How tall is the tower of Orsa Point Lighthouse?", "height", ("47",)),
            ("Who was the last keeper of Orsa Point Lighthouse?", "keeper", ("Eda Quill",)),
        ),
    ),
    Sheet(
        "tallow-rock-lighthouse.md",
        "# Tallow Rock Lighthouse\n\nTallow Rock Lighthouse sits on a reef off the town of "
        "Brisk. It was built by Anselm Kroy in 1851. Its tower is 22 metres tall and made "
        "of granite from the Vell quarry. The last keeper, Jorun Pask, left in 1958.",
        (
            ("Who built Tallow Rock Lighthouse?", "builder", ("Anselm Kroy",)),
            ("In what year was Tallow Rock Lighthouse built?", "year", ("1851",)),
            ("How tall is the tower of Tallow Rock Lighthouse?", "height", ("22",)),
            ("Where does the granite of Tallow Rock Lighthouse come from?", "quarry", ("Vell",)),
        ),
    ),
    Sheet(
        "emberline-bridge.md",
        "# The Emberline Bridge\n\nThe Emberline Bridge crosses the river Sorrow at the city "
        "of Caddan. It was designed by Rafe Ulloa and opened in 1933. Its main span is 412 "
        "metres long. It carries two tram lines and a footpath.",
        (
            ("Who designed the Emberline Bridge?", "builder", ("Rafe Ulloa",)),
            ("In what year did the Emberline Bridge open?", "year", ("1933",)),
            ("How long is the main span of the Emberline Bridge?", "length", ("412",)),
            ("Which river does the Emberline Bridge cross?", "river", ("Sorrow",)),
        ),
    ),
    Sheet(
        "gull-harbour-bridge.md",
        "# Gull Harbour Bridge\n\nGull Harbour Bridge crosses the river Tamsel at the port of "
        "Ferrow. It was designed by Nadia Kestrel and opened in 1968. Its main span is 280 "
        "metres long. It is closed to traffic every year on the first of May for the kite "
        "festival.",
        (
            ("Who designed Gull Harbour Bridge?", "builder", ("Nadia Kestrel",)),
            ("In what year did Gull Harbour Bridge open?", "year", ("1968",)),
            ("How long is the main span of Gull Harbour Bridge?", "length", ("280",)),
            ("Which river does Gull Harbour Bridge cross?", "river", ("Tamsel",)),
        ),
    ),
    Sheet(
        "halden-observatory.md",
        "# Halden Observatory\n\nHalden Observatory stands on Mount Corrin, 2,140 metres above "
        "the sea. It was founded by Piet Savaro in 1897. Its main telescope has a mirror "
        "of 1.8 metres. The observatory discovered the comet Halden-Ivers in 1921.",
        (
            ("Who founded Halden Observatory?", "builder", ("Piet Savaro",)),
            ("In what year was Halden Observatory founded?", "year", ("1897",)),
            ("On which mountain does Halden Observatory stand?", "mountain", ("Corrin",)),
            ("Which comet did Halden Observatory discover?", "comet", ("Halden-Ivers",)),
        ),
    ),
    Sheet(
        "mirecroft-observatory.md",
        "# Mirecroft Observatory\n\nMirecroft Observatory stands on Mount Ebbe, 1,650 metres "
        "above the sea. It was founded by Colette Marr in 1912. Its main telescope has a "
        "mirror of 2.4 metres. The observatory discovered the comet Mirecroft-Dahl in 1950.",
        (
            ("Who founded Mirecroft Observatory?", "builder", ("Colette Marr",)),
            ("In what year was Mirecroft Observatory founded?", "year", ("1912",)),
            ("On which mountain does Mirecroft Observatory stand?", "mountain", ("Ebbe",)),
            ("Which comet did Mirecroft Observatory discover?", "comet", ("Mirecroft-Dahl",)),
        ),
    ),
    Sheet(
        "saltmarsh-library.md",
        "# Saltmarsh Library\n\nSaltmarsh Library is the public library of the town of "
        "Wendle. It was founded by Odile Fenwick in 1889 and holds 86,000 books. Its reading "
        "room has a glass dome. The library's oldest book is a herbal printed in 1502.",
        (
            ("Who founded Saltmarsh Library?", "builder", ("Odile Fenwick",)),
            ("In what year was Saltmarsh Library founded?", "year", ("1889",)),
            ("How many books does Saltmarsh Library hold?", "count", ("86,000", "86000")),
            ("In which town is Saltmarsh Library?", "town", ("Wendle",)),
        ),
    ),
    Sheet(
        "corvin-library.md",
        "# Corvin Library\n\nCorvin Library is the university library of the city of Arrask. "
        "It was founded by Bastian Corvin in 1921 and holds 412,000 books. Its reading room "
        "is open day and night. The library's oldest book is an atlas printed in 1570.",
        (
            ("Who founded Corvin Library?", "builder", ("Bastian Corvin",)),
            ("In what year was Corvin Library founded?", "year", ("1921",)),
            ("How many books does Corvin Library hold?", "count", ("412,000", "412000")),
            ("In which city is Corvin Library?", "town", ("Arrask",)),
        ),
    ),
    Sheet(
        "pellory-clocktower.md",
        "# Pellory Clock Tower\n\nPellory Clock Tower stands in the market square of Dunmere. "
        "It was built by Hester Vane in 1788. Its bell weighs 3 tonnes and is called Old "
        "Maud. The clock was made by the Fettle workshop.",
        (
            ("Who built Pellory Clock Tower?", "builder", ("Hester Vane",)),
            ("In what year was Pellory Clock Tower built?", "year", ("1788",)),
            ("What is the bell of Pellory Clock Tower called?", "bell", ("Old Maud",)),
            ("Which workshop made the clock of Pellory Clock Tower?", "maker", ("Fettle",)),
        ),
    ),
    Sheet(
        "ashgrove-clocktower.md",
        "# Ashgrove Clock Tower\n\nAshgrove Clock Tower stands beside the railway station of "
        "Pollen. It was built by Leopold Strand in 1864. Its bell weighs 2 tonnes and is "
        "called Big Wren. The clock was made by the Harrow and Sons workshop.",
        (
            ("Who built Ashgrove Clock Tower?", "builder", ("Leopold Strand",)),
            ("In what year was Ashgrove Clock Tower built?", "year", ("1864",)),
            ("What is the bell of Ashgrove Clock Tower called?", "bell", ("Big Wren",)),
            ("Which workshop made the clock of Ashgrove Clock Tower?", "maker", ("Harrow",)),
        ),
    ),
    Sheet(
        "quenby-canal.md",
        "# The Quenby Canal\n\nThe Quenby Canal links the towns of Stoll and Marrow. It was "
        "dug by Wilhelmina Trask between 1790 and 1796. It is 38 kilometres long and has 14 "
        "locks. Its tunnel under Hob Hill is 900 metres long.",
        (
            ("Who dug the Quenby Canal?", "builder", ("Wilhelmina Trask",)),
            ("How many locks does the Quenby Canal have?", "locks", ("14",)),
            ("How long is the Quenby Canal?", "length", ("38",)),
            ("Which hill does the tunnel of the Quenby Canal pass under?", "hill", ("Hob",)),
        ),
    ),
)

UNANSWERABLE = (
    "What colour is the door of Varnholm Lighthouse?",
    "How many visitors does Orsa Point Lighthouse get each year?",
    "Who repaired the Emberline Bridge in 1990?",
    "What is the toll for crossing Gull Harbour Bridge?",
    "Who is the current director of Halden Observatory?",
    "How many people work at Mirecroft Observatory?",
    "What are the opening hours of Saltmarsh Library on Sundays?",
    "How much did it cost to build Pellory Clock Tower?",
    "How many boats use the Quenby Canal each year?",
    "Who painted the ceiling of Corvin Library?",
)

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
