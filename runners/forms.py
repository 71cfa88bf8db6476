"""Admin forms for runner configs: a write-only API key and clear validation.

The API key never travels back to the browser: the field is a password input
that does not render its value, a blank field keeps the stored key, and the
"clear key" box removes it. What the admin sees of a stored key is
`runners.crypto.mask` of it.
"""

from __future__ import annotations

import re

from django import forms
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError

from runners import crypto
from runners.models import GuardianRule, RunnerConfig
from runners.registry import KIND_CHOICES, RUNNER_KINDS

PROMPT_MAX_CHARS = 4000


def key_status(config: RunnerConfig | None) -> str:
    """A sentence about the stored key that reveals at most its last two characters."""
    if config is None or not config.api_key_encrypted:
        return "No key stored."
    plain = config.api_key
    if not plain:
        return (
            "A key is stored but cannot be decrypted with the current SECRET_KEY: add the "
            "old key to SECRET_KEY_FALLBACKS, or enter the API key again."
        )
    return f"Stored, encrypted: {crypto.mask(plain)}"


class RunnerConfigForm(forms.ModelForm):
    """The change form. Field validation comes from the model (validators and
    `RunnerConfig.clean()`, run by ModelForm through `full_clean`)."""

    api_key = forms.CharField(
        label="API key",
        required=False,
        strip=True,
        max_length=4096,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only: sent as a Bearer token to the Llama Stack endpoint, stored "
        "encrypted with a key derived from SECRET_KEY. Leave blank to keep the current key.",
    )
    clear_api_key = forms.BooleanField(
        label="Clear the stored key",
        required=False,
        help_text="Remove the stored API key (the runner then sends none).",
    )

    class Meta:
        model = RunnerConfig
        fields = [
            "name",
            "kind",
            "enabled",
            "priority",
            "model_id",
            "endpoint",
            "temperature",
            "max_tokens",
            "context_tokens",
            "timeout_seconds",
            "enable_vision",
            "enable_rag",
            "enable_agents",
            "extra_params",
            "groups",
        ]
        help_texts = {
            "enabled": "Disabled runners are never chosen, and pinning one is refused.",
            "priority": "A whole number >= 0. Among the runners able to answer a request the "
            "highest priority is tried first (ties: the one with the lower recent time to "
            "first token); on a failure before its first token the next one is tried.",
            "temperature": "Default sampling temperature, 0 to 2, when a request sets none "
            "(answers grounded in documents are greedy, 0, unless the request sets one).",
            "max_tokens": "Largest answer, 1 to 32768 tokens; a request may ask for fewer.",
            "context_tokens": "The model's context budget (prompt + answer), 256 to 1048576 "
            "tokens; older turns are left out to fit it.",
            "timeout_seconds": "How long the Llama Stack runner waits for its server, 1 to "
            "3600 seconds (the local runner does not use it).",
            "enable_vision": "Capability vlm: requests with an image go only to runners "
            "with this on.",
            "enable_rag": "Preferred for requests that use documents (RAG); when no enabled "
            "runner has it on, any runner answers them.",
            "enable_agents": "Capability agent: requests with tools go only to runners with "
            "this on.",
            "extra_params": "Options as a JSON object (see docs/runners.md). Any kind: "
            '"loop_guard": false, or {"min_repeats": 4, "min_chars": 200, "max_period": 400} '
            "(answers that repeat themselves are stopped). Local runner (executorch) sampling "
            "defaults for requests that set none: top_k (40), top_p (0.9), "
            "repetition_penalty (1.1), frequency_penalty (0), presence_penalty (0), "
            'penalty_window (64), seed (none), logit_bias ({"token id": -100..100}); also '
            "pte_path, tokenizer_path, parallelism, reuse_kv_cache. Llama Stack: other keys "
            'go into the request body, e.g. {"top_p": 0.9}.',
        }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["kind"].help_text = "The runner implementation: " + ", ".join(
            f"{value} ({label})" for value, label in KIND_CHOICES
        )

    def clean_kind(self) -> str:
        kind = self.cleaned_data["kind"]
        if kind not in RUNNER_KINDS:
            raise ValidationError(
                f"Unknown runner kind {kind!r}; choose one of: {', '.join(sorted(RUNNER_KINDS))}."
            )
        return kind

    def clean_endpoint(self) -> str:
        endpoint = self.cleaned_data.get("endpoint", "").strip()
        if "@" in endpoint.split("://", 1)[-1].split("/", 1)[0]:
            # The endpoint is shown in lists and error messages; a key in it would leak.
            raise ValidationError(
                "Do not put credentials in the URL; enter the key in the API key field."
            )
        return endpoint

    def clean_extra_params(self):
        value = self.cleaned_data.get("extra_params")
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValidationError(
                'Extra params must be a JSON object such as {"top_p": 0.9}, '
                f"not a JSON {type(value).__name__}."
            )
        return value

    def clean(self) -> dict:
        cleaned = super().clean()
        if cleaned.get("clear_api_key") and cleaned.get("api_key"):
            # Never echo the key: the field does not render its value anyway.
            self.add_error(
                "api_key", "Either enter a new key or tick “clear the stored key”, not both."
            )
        return cleaned

    def save(self, commit: bool = True) -> RunnerConfig:
        config = super().save(commit=False)
        if self.cleaned_data.get("clear_api_key"):
            config.api_key = ""
        elif self.cleaned_data.get("api_key"):
            config.api_key = self.cleaned_data["api_key"]
        if commit:
            config.save()
            self._save_m2m()
        return config


class LabelledRowForm(forms.ModelForm):
    """An admin list's inline form whose inputs say what they are: the list
    shows them in table cells without a <label>, so screen readers would hear
    only "checkbox"; each gets an accessible name like "Enabled: local"."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for field in self.fields.values():
            field.widget.attrs["aria-label"] = f"{str(field.label).capitalize()}: {self.instance}"


class RunnerConfigListForm(LabelledRowForm):
    """The list page's inline form (enabled, priority). `RunnerConfig.clean()`
    also checks fields that are not in this form (e.g. enabling a Llama Stack
    runner without an endpoint); those errors are shown on the row instead of
    crashing the page."""

    class Meta:
        model = RunnerConfig
        fields = ["enabled", "priority"]

    def _update_errors(self, errors: ValidationError) -> None:
        if hasattr(errors, "error_dict"):
            remapped: dict[str, list] = {}
            for field, messages in errors.error_dict.items():
                if field == NON_FIELD_ERRORS or field in self.fields:
                    remapped.setdefault(field, []).extend(messages)
                    continue
                label = RunnerConfig._meta.get_field(field).verbose_name
                for message in messages:
                    text = " ".join(message.messages)
                    remapped.setdefault(NON_FIELD_ERRORS, []).append(
                        ValidationError(f"{str(label).capitalize()}: {text} (edit the runner)")
                    )
            errors = ValidationError(remapped)
        super()._update_errors(errors)


class TestPromptForm(forms.Form):
    """The admin's "send a test prompt" page."""

    prompt = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4, "cols": 80}),
        max_length=PROMPT_MAX_CHARS,
        strip=True,
        initial="Say hello in one short sentence.",
        help_text="Sent as one user message to each selected runner, pinned (no fallback, "
        "no guardian rules), and recorded as a run with source “admin”.",
    )
    max_tokens = forms.IntegerField(
        min_value=1,
        max_value=4096,
        initial=64,
        help_text="At most this many answer tokens (also capped by the runner's own maximum).",
    )


GUARDIAN_KIND_HELP = {
    "max_length": "Input only: a message longer than the value (a whole number of "
    "characters) is refused.",
    "block_term": "A term, matched case-insensitively as whole words: input containing it is "
    "refused; output containing it is stopped (what was already shown stays).",
    "block_pattern": "A Python regular expression, case-insensitive: likewise refuses input "
    "and stops output.",
    "mask_term": "Output only: the term is replaced by [masked] as the answer streams, even "
    "when it arrives split across tokens.",
    "mask_pattern": "Output only: matches of the regular expression are replaced by [masked] "
    "while streaming (matches up to 48 characters long are caught across tokens).",
}


class GuardianRuleForm(forms.ModelForm):
    """Refuses combinations the guardian would silently ignore."""

    class Meta:
        model = GuardianRule
        fields = ["name", "kind", "value", "applies_to", "message", "enabled"]
        help_texts = {
            "kind": "What the rule does; each kind is described above.",
            "applies_to": "Where the rule is checked: the user's input, the streamed "
            "answer, or both.",
        }

    def clean(self) -> dict:
        cleaned = super().clean()
        kind, applies = cleaned.get("kind"), cleaned.get("applies_to")
        if kind == GuardianRule.Kind.MAX_LENGTH and applies == GuardianRule.Applies.OUTPUT:
            self.add_error("applies_to", "A maximum length applies to input only; choose “input”.")
        if kind in {GuardianRule.Kind.MASK_TERM, GuardianRule.Kind.MASK_PATTERN} and (
            applies == GuardianRule.Applies.INPUT
        ):
            self.add_error(
                "applies_to",
                "Masking applies to the streamed answer only; choose “output” (or “both”), "
                "or use a block rule for input.",
            )
        value = cleaned.get("value") or ""
        if kind in {GuardianRule.Kind.BLOCK_PATTERN, GuardianRule.Kind.MASK_PATTERN}:
            try:
                empty_match = re.compile(value, re.IGNORECASE).search("") is not None
            except re.error:
                empty_match = False  # reported by the model's clean()
            if empty_match:
                self.add_error(
                    "value",
                    "This pattern matches empty text, so it would match every message; "
                    "make it require at least one character (e.g. + instead of *).",
                )
        return cleaned
