"""`openllama serve SOURCE`: a checkpoint behind an OpenAI-compatible HTTP API, on Ray Serve.

SOURCE is a checkpoint, a training run (its newest checkpoint) or `models:/NAME/VERSION` of MLflow's
registry. The command starts Ray in-process (or joins RAY_ADDRESS), deploys the application (`application`:
`eval/endpoint.py`'s deployment, `replicas` copies) with Ray Serve's HTTP proxy on `host:port`, prints the
URL with a `curl` line, and serves until Ctrl-C or SIGTERM, when it deletes the application. `--detach`
leaves it running on the cluster of RAY_ADDRESS (what `make demo` ends with); `openllama serve --stop`
deletes it. `app_builder` is the same application for Ray's own `serve run` / `serve deploy` (configs/serve/).

Loopback by default: listening on any other address needs an API key (`api_key`, or OPENLLAMA_API_KEY), and
then every request must carry `Authorization: Bearer KEY`. Replicas receive only the key's SHA-256.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openllama import files
from openllama.config import POSITIONAL, ConfigError, build
from openllama.ray_jobs import connect

APP_NAME = "openllama"  # the Serve application `--detach` starts and `--stop` deletes
API_KEY_ENV = "OPENLLAMA_API_KEY"
REGISTRY_PREFIX = "models:/"  # a registered version (train/registry.py reads it)
EXAMPLE_PROMPT = "Q: What is the largest animal?\nA:"


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    """`openllama serve`'s settings: what to serve, where, and how many prompts decode together."""

    # a model checkpoint, a training run directory (its newest checkpoint), or models:/NAME/VERSION of MLflow's
    # registry (MLFLOW_TRACKING_URI); not needed with --stop
    source: str | None = field(default=None, metadata={POSITIONAL: True})
    host: str = "127.0.0.1"  # the address to listen on; any other than loopback needs an API key
    port: int = 8000  # the HTTP port
    # the dtype of the weights and of the compute (None: the dtype the weights were saved in)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    name: str | None = None  # the model id requests name (None: the run's, checkpoint's or registered model's name)
    tokenizer: str | None = None  # SentencePiece tokenizer.model (None: the checkpoint's own)
    # requests must carry `Authorization: Bearer KEY` (None: $OPENLLAMA_API_KEY if set); prefer the variable, a
    # flag's value shows in the process list
    api_key: str | None = None
    max_batch_size: int = 16  # prompts decoded together at most
    batch_wait_ms: float = 10.0  # how long a batch waits for more prompts after its first one arrived
    replicas: int = 1  # copies of the model, each a Ray actor taking its share of the requests
    num_cpus: float = 1.0  # CPUs each replica reserves on the Ray cluster
    num_gpus: float = 0.0  # GPUs each replica reserves (JAX then runs on them)
    detach: bool = False  # deploy on the Ray cluster of RAY_ADDRESS and return; `openllama serve --stop` ends it
    stop: bool = False  # delete the application `--detach` started on the Ray cluster of RAY_ADDRESS

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port={self.port} must be in 1..65535")
        if self.max_batch_size < 1 or self.replicas < 1:
            raise ConfigError(f"max_batch_size={self.max_batch_size} and replicas={self.replicas} must be at least 1")
        if self.batch_wait_ms < 0 or self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("batch_wait_ms, num_cpus and num_gpus must be 0 or more")
        if not is_loopback(self.host) and not self.key():
            raise ConfigError(f"host={self.host} is reachable from other machines: set {API_KEY_ENV} (or api_key) so "
                              "that only clients with the key are answered, or listen on 127.0.0.1")

    def key(self) -> str | None:
        """The API key clients must present, if any."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None


def served_name(source: str) -> str:
    """The model id a source is served as: a registered model's NAME, else its run's or its folder's name."""
    if source.startswith(REGISTRY_PREFIX):
        return source[len(REGISTRY_PREFIX):].split("/")[0]
    parts = [part for part in source.rstrip("/").split("/") if part]
    while len(parts) > 1 and (parts[-1] == "checkpoints" or parts[-1].startswith("step_")):
        parts.pop()
    return parts[-1] if parts else "openllama"


def located(source: str) -> str:
    """`source` as a replica anywhere reads it: a local path made absolute (a replica has its own working dir)."""
    if source.startswith(REGISTRY_PREFIX) or files.is_uri(source):
        return source
    return str(Path(source).absolute())


def application(settings: ServeConfig) -> Any:
    """The Serve application for `settings`: what `openllama serve` runs and `app_builder` gives `serve run`."""
    from openllama.eval.endpoint import deployment  # here: it imports Ray Serve, which comes after `connect`

    if settings.source is None:
        raise ConfigError("source is required: a checkpoint, a training run directory or models:/NAME/VERSION")
    public = dataclasses.replace(settings, source=located(settings.source), api_key=None,
                                 name=settings.name or served_name(settings.source))
    return deployment(public, settings.key())


def app_builder(args: dict[str, Any]) -> Any:
    """`serve run openllama.eval.serve:app_builder source=CKPT ...` (or a config's `args:`): ServeConfig's fields."""
    return application(build(ServeConfig, dict(args)))


def check_source(settings: ServeConfig) -> None:
    """Refuse a source that cannot be served before Ray starts: a missing checkpoint or tokenizer, an unknown
    registered version."""
    # here, not at the top: jax, orbax and MLflow take seconds to import, and `--stop` and `--help` need none
    from openllama import tracking
    from openllama.train import checkpoint, registry

    version = registry.parse_model_uri(settings.source)
    if version is not None:
        try:
            tracking.client().get_model_version(version.name, version.version)
        except Exception as error:
            raise ConfigError(f"{settings.source}: no such version in the registry of {tracking.tracking_uri()} "
                              f"({registry.one_line(error)})") from None
        return
    if settings.tokenizer is None and checkpoint.tokenizer_of(settings.source) is None:
        raise ConfigError(f"checkpoint {checkpoint.resolve(settings.source)} has no {checkpoint.TOKENIZER}; "
                          "pass --tokenizer PATH")


def curl_line(settings: ServeConfig, name: str) -> str:
    body = json.dumps({"model": name, "prompt": EXAMPLE_PROMPT, "max_tokens": 16})
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if settings.key() else ""
    return (f"curl http://{settings.host}:{settings.port}/v1/completions -H 'Content-Type: application/json'{auth} "
            f"-d '{body}'")


def serve_command(settings: ServeConfig) -> None:
    """Serve a checkpoint over OpenAI's completions API (Ray Serve): GET /v1/models, POST /v1/completions.

    Runs until Ctrl-C or SIGTERM; with --detach it stays on the Ray cluster of RAY_ADDRESS, and
    `openllama serve --stop` ends it there."""
    address = os.environ.get("RAY_ADDRESS")
    if (settings.detach or settings.stop) and not address:
        raise ConfigError(f"--{'detach' if settings.detach else 'stop'} works on a running Ray cluster: set "
                          "RAY_ADDRESS (an in-process Ray ends with this command)")
    if settings.stop:
        connect(log_to_driver=False)
        from ray import serve  # here: after `connect`, which sets up how an in-process Ray listens

        serve.delete(APP_NAME)
        if not serve.status().applications:
            serve.shutdown()  # the HTTP proxy too, so that the port is free
        print(f"openllama serve: stopped the application {APP_NAME!r} on {address}", flush=True)
        return
    if settings.source is None:
        raise ConfigError("source is required: a checkpoint, a training run directory or models:/NAME/VERSION")
    check_source(settings)
    name = settings.name or served_name(settings.source)
    connect()
    from ray import serve  # here: after `connect`, which sets up how an in-process Ray listens

    stopping = threading.Event()  # set up before the proxy listens: a SIGTERM as soon as it answers ends cleanly
    if not settings.detach:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stopping.set())
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings), name=APP_NAME, route_prefix="/")
    url = f"http://{settings.host}:{settings.port}/v1"
    ends = "`openllama serve --stop` ends it" if settings.detach else "Ctrl-C ends it"
    print(f"openllama serve: {name} at {url} ({ends}); try: {curl_line(settings, name)}", flush=True)
    if settings.detach:
        return
    while not stopping.wait(1.0):
        pass
    serve.delete(APP_NAME)
    if address is None:
        serve.shutdown()
