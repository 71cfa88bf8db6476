"""`manage.py evaluate_model` and the runner admin's "Measured on this machine"
(issue 17): the prepared SmolLM2 program measured for real through the
runner's decode loop, its result kept in the model cache under the program's
manifest key, and shown on the local runner's admin page."""

from __future__ import annotations

import json
import shutil
from io import StringIO
from pathlib import Path

from django.conf import settings
from django.core.management import CommandError, call_command
from django.urls import reverse

import pytest
from asgiref.sync import async_to_sync

from runners.executorch import evaluate, prepare
from runners.models import RunnerConfig
from tests.support.fixtures import runner_config

pytestmark = [pytest.mark.usefixtures("isolated_cache")]

QUESTIONS = evaluate.QUESTIONS[:2]  # France, Japan


@pytest.fixture
def isolated_cache(settings, tmp_path) -> Path:
    settings.MODEL_CACHE_DIR = tmp_path / "cache"
    return settings.MODEL_CACHE_DIR


def measured(**fields) -> evaluate.Evaluation:
    values = {
        "model": "SmolLM2-135M-Instruct",
        "variant": "8da4w",
        "key": "k" * 64,
        "measured_at": "2026-12-02T15:00:00Z",
        "cores": 2,
        "prefill_tps": 500.0,
        "decode_tps": 200.0,
        "ttft_ms": 90.0,
        "answers": ("Paris.", "Tokyo."),
        "questions": QUESTIONS,
    }
    return evaluate.Evaluation(**(values | fields))


def copy_of_model(tmp_path: Path, **manifest_changes) -> Path:
    """A prepared-model directory whose files link to the real ones, its
    manifest (a copy) changed as asked."""
    directory = tmp_path / "model"
    directory.mkdir()
    for name in prepare.OUTPUT_FILES:
        (directory / name).symlink_to(Path(settings.MODELS_DIR) / name)
    manifest = prepare.read_manifest(Path(settings.MODELS_DIR)) | manifest_changes
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


# ---- agreement and storage (no model needed) --------------------------------------------


def test_agreement_counts_answers_identical_to_the_references():
    reference = measured(variant="fp32", key="r" * 64, answers=("Paris.", "Tokyo."))
    assert evaluate.compared(measured(), reference).same_as_reference == 2
    one = evaluate.compared(measured(answers=("Paris.", "Tokyo, Japan.")), reference)
    assert (one.same_as_reference, one.reference_variant) == (1, "fp32")
    assert "identical to fp32's on 1 of 2 questions" in one.summary()
    with pytest.raises(ValueError):
        evaluate.compared(measured(), measured(questions=("Other?", "Questions?")))


def test_the_reference_compared_with_itself_picks_its_own_next_token_at_every_step():
    reference = measured(variant="fp32", key="r" * 64, paths=((1, 2, 3), (4, 2)))
    itself = evaluate.compared(reference, reference)
    assert (itself.same_next_token, itself.steps) == (5, 5)
    assert "the same next token at 100.0 % of the 5 steps" in itself.summary()
    other = evaluate.compared(measured(same_next_token=4, steps=5), reference)
    assert (other.same_next_token, other.steps) == (4, 5)  # measured by `follow`, kept
    assert "the same next token at 80.0 % of the 5 steps" in other.summary()


def test_a_result_stored_before_answer_tokens_were_recorded_still_loads(
    isolated_cache, tmp_path, model_ready
):
    directory = copy_of_model(tmp_path)
    key = prepare.read_manifest(directory)["key"]
    path = evaluate.store(isolated_cache, measured(key=key))
    data = json.loads(path.read_text())
    for name in ("paths", "same_next_token", "steps"):
        del data[name]
    path.write_text(json.dumps(data))
    assert evaluate.stored(isolated_cache, directory) == measured(key=key)


def test_a_stored_result_belongs_to_its_program_only(isolated_cache, tmp_path, model_ready):
    directory = copy_of_model(tmp_path)
    key = prepare.read_manifest(directory)["key"]
    evaluate.store(isolated_cache, measured(key=key))
    assert evaluate.stored(isolated_cache, directory) == measured(key=key)
    assert evaluate.stored(isolated_cache, Path(settings.MODELS_DIR)) == measured(key=key)
    # Re-prepared (another key): measured afresh, the old figures are not shown.
    (directory / "manifest.json").write_text(json.dumps({"key": "0" * 64}))
    assert evaluate.stored(isolated_cache, directory) is None
    assert evaluate.stored(isolated_cache, tmp_path / "nothing-here") is None


def test_limited_keeps_a_prefix_of_the_questions_only():
    full = measured(questions=evaluate.QUESTIONS[:3], answers=("a", "b", "c"))
    assert evaluate.limited(full, QUESTIONS) == measured(answers=("a", "b"))
    assert evaluate.limited(full, evaluate.QUESTIONS[1:3]) is None


# ---- measuring the real program -----------------------------------------------------------


@pytest.mark.slow
def test_it_measures_the_real_program_through_the_runner(model_ready, local_model_idle):
    result = async_to_sync(evaluate.evaluate)(
        Path(settings.MODELS_DIR), questions=QUESTIONS, speed_runs=1, progress=lambda _: None
    )
    manifest = prepare.read_manifest(Path(settings.MODELS_DIR))
    assert (result.key, result.variant) == (manifest["key"], manifest["variant"])
    assert "Paris" in result.answers[0] and "Tokyo" in result.answers[1]
    assert result.decode_tps > 1 and result.prefill_tps > 1 and result.ttft_ms > 0
    assert result.same_as_reference is None and result.same_next_token is None

    # Its answers' tokens are the answers (read from the raw logits, as the
    # runner's greedy decoding picks them).
    runner = evaluate.measuring_runner(Path(settings.MODELS_DIR))
    async_to_sync(runner.load)()
    tokenizer = runner._engine.tokenizer
    for path, text in zip(result.paths, result.answers, strict=True):
        assert 0 < len(path) <= evaluate.ANSWER_TOKENS
        assert text in tokenizer.decode(list(path))
    # Fed its own answers, it picks each next token again; fed other tokens, not.
    same, steps = async_to_sync(evaluate.follow)(runner, QUESTIONS, result.paths)
    assert same == steps == sum(len(path) for path in result.paths)
    backwards = [path[::-1] for path in result.paths]
    same, steps = async_to_sync(evaluate.follow)(runner, QUESTIONS, backwards)
    assert steps == sum(len(path) for path in result.paths) and same < steps / 2


@pytest.mark.slow
@pytest.mark.django_db
def test_the_command_stores_what_the_admin_shows(
    isolated_cache, model_ready, local_model_idle, admin_client
):
    local = RunnerConfig.objects.create(name="local", kind="executorch", priority=1)
    remote = runner_config("http://127.0.0.1:9/v1", "remote")
    page = admin_client.get(reverse("admin:runners_runnerconfig_change", args=[local.pk]))
    assert "Measured on this machine" in page.text and "Not measured yet" in page.text
    assert "manage.py evaluate_model" in page.text

    out = StringIO()
    args = ["--questions", "2", "--speed-runs", "1"]
    call_command("evaluate_model", "--no-reference", *args, stdout=out)
    first = evaluate.stored(isolated_cache, Path(settings.MODELS_DIR))
    assert first is not None and first.same_as_reference is None
    assert first.summary() in out.getvalue()
    page = admin_client.get(reverse("admin:runners_runnerconfig_change", args=[local.pk]))
    assert f"decode {first.decode_tps:.1f} tok/s" in page.text
    assert "answer agreement not measured" in page.text

    # Compared with itself: its stored answers are the reference's (not measured
    # again), and every one agrees.
    out = StringIO()
    call_command("evaluate_model", "--reference-dir", str(settings.MODELS_DIR), *args, stdout=out)
    assert "Measuring" not in out.getvalue()
    second = evaluate.stored(isolated_cache, Path(settings.MODELS_DIR))
    assert second.measured_at == first.measured_at and second.same_as_reference == 2
    page = admin_client.get(reverse("admin:runners_runnerconfig_change", args=[local.pk]))
    assert f"identical to {first.variant}&#x27;s on 2 of 2 questions" in page.text
    assert "the same next token at 100.0 %" in page.text

    # A remote runner has no local program to measure.
    page = admin_client.get(reverse("admin:runners_runnerconfig_change", args=[remote.pk]))
    assert page.status_code == 200 and "Measured on this machine" not in page.text


def test_the_command_refuses_what_it_cannot_measure(tmp_path, model_ready):
    with pytest.raises(CommandError, match="No prepared model"):
        call_command("evaluate_model", "--model-dir", str(tmp_path), stdout=StringIO())
    with pytest.raises(CommandError, match="--questions"):
        call_command("evaluate_model", "--questions", "0", stdout=StringIO())
    # Prepared from a GGUF of the user's: its fp32 reference needs that file.
    own = copy_of_model(tmp_path, gguf_name="mine.gguf", gguf_sha256="f" * 64)
    with pytest.raises(CommandError, match="pass --gguf PATH"):
        call_command("evaluate_model", "--model-dir", str(own), stdout=StringIO())
    other = tmp_path / "other.gguf"
    shutil.copyfile(Path(__file__), other)
    with pytest.raises(CommandError, match="was not prepared from"):
        call_command(
            "evaluate_model", "--model-dir", str(own), "--gguf", str(other), stdout=StringIO()
        )
