"""The image's start command (Dockerfile CMD), run by the shell as the image
runs it, with `python` and `daphne` on PATH replaced by scripts that print
their arguments: Daphne gets `--proxy-headers` exactly when PROXY_HEADERS=true
(README, "Deploying to production"), and the same websocket limits as
`make run`."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.support.processes import DAPHNE_ARGS, ROOT


def image_cmd() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    return json.loads(cmd)


def image_default(name: str) -> str:
    text = (ROOT / "Dockerfile").read_text()
    env = " ".join(re.findall(r"^ENV ((?:.*\\\n)*.*)$", text, re.M)).replace("\\\n", " ")
    return dict(pair.split("=", 1) for pair in env.split())[name]


def daphne_argv(tmp_path, **env: str) -> list[str]:
    """The arguments the image's CMD starts Daphne with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "daphne"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nprintf "{name}"; printf " %s" "$@"; echo\n')
        script.chmod(0o755)
    result = subprocess.run(
        image_cmd(),
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("daphne ")]
    return line.split()[1:]


def test_the_image_does_not_trust_forwarded_addresses_by_default(tmp_path):
    assert image_default("PROXY_HEADERS") == "false"
    argv = daphne_argv(tmp_path, PROXY_HEADERS=image_default("PROXY_HEADERS"))
    assert "--proxy-headers" not in argv
    assert argv[-1] == "breezeweb.asgi:application"


@pytest.mark.parametrize("value", ["false", "", "1", "TRUE "])
def test_only_proxy_headers_true_turns_them_on(tmp_path, value):
    assert "--proxy-headers" not in daphne_argv(tmp_path, PROXY_HEADERS=value)


def test_behind_a_proxy_daphne_takes_the_client_address_from_the_proxy(tmp_path):
    argv = daphne_argv(tmp_path, PROXY_HEADERS="true")
    assert argv.count("--proxy-headers") == 1
    assert argv[-1] == "breezeweb.asgi:application"
    # The websocket limits of `make run` and the test servers, in both cases.
    joined = " ".join(argv)
    assert " ".join(DAPHNE_ARGS) in joined
    assert argv[:4] == ["-b", "0.0.0.0", "-p", "8000"]
