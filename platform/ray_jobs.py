"""Reaching a Ray cluster: where it is, how to authenticate, and submitting work with `ray job submit`.

Where: `--address` or `RAY_ADDRESS` name a cluster; with neither, a CLI verb starts Ray in-process
(`connect`). `ray job submit` talks to the dashboard's HTTP address (http://HOST:8265 by default), which
`RAY_API_SERVER_ADDRESS` or `--address` give.

Authentication (Ray 2.60): a head runs with token auth when `RAY_AUTH_MODE=token` was set when it
started, or when it was unset but a token file existed (~/.ray/auth_token, written by any in-process
`ray.init()`). A client that names an explicit address never turns token mode on by itself, so against
such a head `ray job submit` fails with `AuthenticationError: ... RAY_AUTH_MODE is currently 'disabled'`.
`client_env` asks the dashboard which mode it runs (a public endpoint) and sets `RAY_AUTH_MODE=token` for
the client when a token is available (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, or ~/.ray/auth_token), or
says exactly what is missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

# never uploaded with --working-dir (Ray already skips what .gitignore lists: .venv, outputs, runs)
WORKING_DIR_EXCLUDES = [".git", "**/__pycache__", ".demo", "runs", "outputs", "mlruns", "*.egg-info"]


# `ray job submit`'s own progress lines ("2026-01-01 10:00:00,000<TAB>INFO cli.py:66 -- ..."): kept in the log,
# not echoed, so the terminal shows the job's output
RAY_CLI_CHATTER = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\t(INFO|SUCC) \w+\.py:\d+ -- ")


class RayAuthError(RuntimeError):
    """The cluster wants a token and this client has none; the message says how to provide one."""


class JobFailed(RuntimeError):
    """A Ray job that did not succeed; the message names it and where its log is."""


def token_available(env: Mapping[str, str]) -> bool:
    """Whether a Ray client run with `env` can find an auth token (the places Ray 2.60 looks)."""
    if env.get("RAY_AUTH_TOKEN"):
        return True
    default = Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"
    return Path(env.get("RAY_AUTH_TOKEN_PATH") or default).is_file()


def auth_mode(api_url: str, timeout: float = 10.0) -> str:
    """The head's authentication mode ('token' or 'disabled'), from its public dashboard endpoint."""
    url = f"{api_url.rstrip('/')}/api/authentication_mode"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())["authentication_mode"]
    except (urllib.error.URLError, OSError) as error:
        raise ConnectionError(
            f"cannot reach the Ray dashboard at {api_url} ({error}); is the cluster running? "
            "`ray job submit` needs the dashboard address, e.g. http://127.0.0.1:8265 "
            "(set RAY_API_SERVER_ADDRESS or pass --address)"
        ) from error


def client_env(api_url: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Ray CLI clients of the cluster at `api_url`, with auth settings made consistent."""
    env = dict(os.environ if base is None else base)
    env["RAY_API_SERVER_ADDRESS"] = api_url
    if auth_mode(api_url) == "token" and env.get("RAY_AUTH_MODE", "").lower() != "token":
        if not token_available(env):
            raise RayAuthError(
                f"the Ray cluster at {api_url} requires token authentication and no token was found; "
                "set RAY_AUTH_TOKEN_PATH to the cluster's token file (for heads started by `make demo`: "
                ".demo/services/ray-auth-token) or RAY_AUTH_TOKEN to its value, then retry"
            )
        env["RAY_AUTH_MODE"] = "token"
    return env


def submit(
    entrypoint: Sequence[str],
    *,
    api_url: str,
    env: Mapping[str, str],
    working_dir: str | Path,
    submission_id: str,
    env_vars: Mapping[str, str] | None = None,
    log_path: str | Path | None = None,
    echo: TextIO | None = None,
) -> str:
    """Run `entrypoint` as a Ray job with `ray job submit` and wait for it; raises JobFailed if it fails.

    The job's output is appended to `log_path`, streamed to `echo` when given (`ray job submit`'s own
    progress lines go to the log only) and returned.
    """
    runtime_env: dict[str, Any] = {"excludes": WORKING_DIR_EXCLUDES}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    command = [
        str(Path(sys.executable).parent / "ray"), "job", "submit",
        "--address", api_url,
        "--submission-id", submission_id,
        "--working-dir", str(working_dir),
        "--runtime-env-json", json.dumps(runtime_env),
        "--", *entrypoint,
    ]
    lines = []
    with (open(log_path or os.devnull, "a", encoding="utf-8") as log,
          subprocess.Popen(command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, errors="replace") as proc):
        for line in proc.stdout:
            if echo is not None and not RAY_CLI_CHATTER.match(line):
                echo.write(line)
            log.write(line)
            lines.append(line)
        code = proc.wait()
    if code != 0:
        where = f"; log {log_path}" if log_path else ""
        raise JobFailed(f"Ray job {submission_id} ({' '.join(entrypoint)}) failed with exit code {code}{where}; "
                        f"see also `ray job logs {submission_id} --address {api_url}`")
    return "".join(lines)


def connect(address: str | None = None, **init_kwargs: Any) -> Any:
    """`ray.init` for a CLI verb: the cluster at `address` or RAY_ADDRESS, else an in-process Ray.

    An in-process Ray listens on 127.0.0.1 only when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before
    `ray` is first imported; we set it here for that case (it must not be set when joining a cluster,
    where the node's routable address is needed).
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray  # here, after the environment above is set: Ray reads it when first imported

    if ray.is_initialized():
        return ray.get_runtime_context()
    if address is None:
        init_kwargs.setdefault("include_dashboard", False)
    return ray.init(address=address, **init_kwargs)
