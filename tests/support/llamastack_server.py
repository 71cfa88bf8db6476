"""A real `llama stack run` server for tests, offline, on 127.0.0.1.

`LlamaStackServer().start()` writes a minimal inference-only run.yaml to a
temp dir (one `remote::openai` provider, id `upstream`, whose upstream is a
`ScriptedServer` started here), launches `.venv/bin/llama stack run` on a
free port bound to 127.0.0.1, and waits for `GET /v1/health`. The upstream's
models are served as `upstream/<id>`: `server.model_id` is
`upstream/scripted-model`. `server.url` is the base URL for
`AsyncLlamaStackClient`; `server.upstream` is the ScriptedServer (script it,
or read what Llama Stack forwarded). If the server does not become healthy
within `startup_timeout` seconds, `start()` raises RuntimeError carrying the
tail of its log; `stop()` terminates it and removes the temp dir.

The `llamastack_server` fixture (tests.support.fixtures) starts one per test
session, on first use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.processes import end_process, wait_until_healthy
from tests.support.scripted_server import ScriptedServer, free_port

PROVIDER_ID = "upstream"
UPSTREAM_MODEL = "scripted-model"

_RUN_YAML = """\
version: 2
distro_name: breezeweb-test
apis:
- inference
providers:
  inference:
  - provider_id: {provider_id}
    provider_type: remote::openai
    config:
      base_url: {upstream}/v1
      api_key: fake-upstream-key
storage:
  backends:
    kv_default:
      type: kv_sqlite
      db_path: {state}/kvstore.db
    sql_default:
      type: sql_sqlite
      db_path: {state}/sql_store.db
  stores:
    metadata:
      namespace: registry
      backend: kv_default
    inference:
      table_name: inference_store
      backend: sql_default
    conversations:
      table_name: openai_conversations
      backend: sql_default
registered_resources:
  models: []
server:
  host: 127.0.0.1
  port: {port}
"""


def _llama_cli() -> str:
    candidate = Path(sys.executable).with_name("llama")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("llama")
    if not found:
        raise RuntimeError("the `llama` CLI (package llama-stack) is not installed")
    return found


class LlamaStackServer:
    """A real Llama Stack server process with a scripted upstream."""

    def __init__(self, startup_timeout: float = 120.0) -> None:
        self.startup_timeout = startup_timeout
        self.upstream = ScriptedServer(models=[UPSTREAM_MODEL])
        self.port = 0
        self.model_id = f"{PROVIDER_ID}/{UPSTREAM_MODEL}"
        self._dir: Path | None = None
        self._process: subprocess.Popen | None = None
        self._log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        if not self._log_path or not self._log_path.exists():
            return "(no log)"
        text = self._log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def start(self) -> LlamaStackServer:
        self.upstream.start()
        self.upstream.strict_models = True
        self._dir = Path(tempfile.mkdtemp(prefix="breezeweb-llamastack-"))
        self.port = free_port()
        config = self._dir / "run.yaml"
        config.write_text(
            _RUN_YAML.format(
                provider_id=PROVIDER_ID,
                upstream=self.upstream.url,
                state=self._dir / "state",
                port=self.port,
            )
        )
        (self._dir / "state").mkdir()
        self._log_path = self._dir / "server.log"
        env = {
            **os.environ,
            "LLAMA_STACK_PORT": str(self.port),
            # Offline: nothing may reach the network; keep its state in our temp dir.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "SQLITE_STORE_DIR": str(self._dir / "state"),
            "LLAMA_STACK_CONFIG_DIR": str(self._dir / "home"),
            "LLAMA_STACK_TELEMETRY_DISABLED": "1",
        }
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [_llama_cli(), "stack", "run", str(config), "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                env=env,
                start_new_session=True,
            )
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        assert self._process is not None
        wait_until_healthy(
            self._process,
            f"{self.url}/v1/health",
            "`llama stack run`",
            self.log_tail,
            self.startup_timeout,
            healthy=lambda r: r.status_code == 200 and r.json().get("status") == "OK",
            interval=0.25,
        )

    def stop(self) -> None:
        process, self._process = self._process, None
        end_process(process)
        self.upstream.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
