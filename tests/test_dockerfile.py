"""The image's start command (Dockerfile CMD), run by the shell as the image
runs it with `python` on PATH replaced by a script that prints its arguments,
then its `manage.py serve` line run for real with --dry-run: uvicorn gets
`--proxy-headers` exactly when PROXY_HEADERS=true (README, "Deploying to
production"), and the same websocket limits as `make run`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from breezeweb.serve import WEBSOCKET_ARGS
from tests.support.processes import ROOT


def image_cmd() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    return json.loads(cmd)


def image_default(name: str) -> str:
    text = (ROOT / "Dockerfile").read_text()
    env = " ".join(re.findall(r"^ENV ((?:.*\\\n)*.*)$", text, re.M)).replace("\\\n", " ")
    return dict(pair.split("=", 1) for pair in env.split())[name]


def serve_argv(tmp_path, **env: str) -> list[str]:
    """The `manage.py serve` command line the image's CMD ends with (run by the
    shell as the image runs it, `python` replaced by a script printing its
    arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "python"
    script.write_text('#!/bin/sh\nprintf "python"; printf " %s" "$@"; echo\n')
    script.chmod(0o755)
    result = subprocess.run(
        image_cmd(),
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    (line,) = [line for line in result.stdout.splitlines() if " serve " in line]
    return line.split()[1:]


def server_argv(tmp_path, **env: str) -> list[str]:
    """The arguments the image's CMD starts uvicorn with: its `manage.py serve`
    line run for real with --dry-run (the embedded defaults: one process)."""
    argv = serve_argv(tmp_path, **env)
    result = subprocess.run(
        [sys.executable, *argv, "--dry-run"],
        cwd=ROOT,
        env={**os.environ, "DATA_DIR": str(tmp_path / "data"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (line,) = [line for line in result.stdout.splitlines() if " -m uvicorn " in line]
    return line.split(" -m uvicorn ", 1)[1].split()


def test_the_image_does_not_trust_forwarded_addresses_by_default(tmp_path):
    assert image_default("PROXY_HEADERS") == "false"
    argv = server_argv(tmp_path, PROXY_HEADERS=image_default("PROXY_HEADERS"))
    assert "--proxy-headers" not in argv and "--no-proxy-headers" in argv
    assert argv[-1] == "breezeweb.asgi:application"


@pytest.mark.parametrize("value", ["false", "", "1", "TRUE "])
def test_only_proxy_headers_true_turns_them_on(tmp_path, value):
    argv = server_argv(tmp_path, PROXY_HEADERS=value)
    assert "--proxy-headers" not in argv and "--no-proxy-headers" in argv


def test_behind_a_proxy_the_server_takes_the_client_address_from_the_proxy(tmp_path):
    argv = server_argv(tmp_path, PROXY_HEADERS="true")
    assert argv.count("--proxy-headers") == 1 and "--no-proxy-headers" not in argv
    assert argv[argv.index("--forwarded-allow-ips") + 1] == "*"  # FORWARDED_ALLOW_IPS's default
    assert argv[-1] == "breezeweb.asgi:application"
    # The websocket limits of `make run` and the test servers, in both cases.
    joined = " ".join(argv)
    assert " ".join(WEBSOCKET_ARGS) in joined
    assert argv[:4] == ["--host", "0.0.0.0", "--port", "8000"]


def test_the_image_serves_through_manage_py_serve_on_port_8000(tmp_path):
    assert serve_argv(tmp_path)[:6] == ["manage.py", "serve", "--bind", "0.0.0.0", "--port", "8000"]
