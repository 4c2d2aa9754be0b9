"""The Ray Serve deployment behind `openllama serve`: OpenAI's routes over one model and its batched decoder.

Each replica loads the model once (`ServedModel`) and answers `GET /v1/models` and `POST /v1/completions`
(the protocol is `eval/completions.py`). Every prompt of every request becomes one row of `decode.RowBatch`:
`@serve.batch` gathers the rows that arrive within `batch_wait_ms` of the first (up to `max_batch_size`) and
decodes them together, prompts of any lengths, a few tokens per device call, handing each row's text back as
it comes, so a stream and a whole response are the same decode. A batch runs until its last row ends, and the
rows that arrive meanwhile form the next batch. Each response says how many rows its decode shared
(`openllama-batch-rows`).

Every refusal is OpenAI's error object: 400 for a request that cannot be served, 401 without the API key when
one is set, 404 for a route there is not; the replica goes on serving. This module imports Ray Serve, so only
what runs the server imports it (`eval/serve.py`, after Ray is set up). No `from __future__ import
annotations` here: FastAPI reads the routes' annotations (`Request`) as objects.
"""

import asyncio
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from openllama import tracking
from openllama.data.tokenizer import load_for_model
from openllama.eval.completions import (
    STREAM_END,
    ApiError,
    Completion,
    CompletionRequest,
    Delta,
    choice,
    completion_id,
    completion_response,
    models_response,
    parse_request,
    stream_event,
    usage,
)
from openllama.eval.decode import Row, RowBatch
from openllama.eval.serve import ServeConfig
from openllama.train import checkpoint, registry
from openllama.train.convert.tree import stored_dtype
from openllama.train.model import DTYPES, ModelRuntime

log = logging.getLogger("openllama.serve")

STEPS_PER_CALL = 8  # decode steps per device call: how often rows hand back text and can stop at a stop string
BATCH_ROWS_HEADER = "openllama-batch-rows"


def key_digest(key: str) -> str:
    """What a replica keeps of the API key: its SHA-256, so the key itself never reaches the cluster."""
    return hashlib.sha256(key.encode()).hexdigest()


def local_checkpoint(source: str) -> Path:
    """The checkpoint `source` names, on this machine: a checkpoint, a run's newest, or a registered version."""
    version = registry.parse_model_uri(source)
    return checkpoint.resolve(source) if version is None else registry.checkpoint_of(version)


@dataclass
class ServedModel:
    """A checkpoint ready to decode: weights in the serving dtype, how to run them, the tokenizer."""

    name: str
    config: Any  # LlamaConfig
    runtime: ModelRuntime
    params: dict
    tokenizer: Any  # SentencePieceProcessor

    @classmethod
    def load(cls, name: str, source: str, dtype: str | None, tokenizer: str | None) -> "ServedModel":
        """`source`'s weights in `dtype` (None: the dtype they were saved in), compute in the same dtype."""
        path = local_checkpoint(source)
        config, params, saved_tokenizer = checkpoint.load_model(path)
        tokenizer = tokenizer or saved_tokenizer
        if tokenizer is None:
            raise FileNotFoundError(f"{source} ({path}) has no {checkpoint.TOKENIZER}; pass --tokenizer PATH")
        sp = load_for_model(tokenizer, config.vocab_size, config.bos_token_id, config.eos_token_id)
        dtype = dtype or stored_dtype(params, str(path))
        params = jax.tree.map(lambda a: a.astype(DTYPES[dtype]), params)
        log.info("serving %s (%s) as %r in %s", source, path, name, dtype)
        return cls(name, config, ModelRuntime(param_dtype=dtype, dtype=dtype), params, sp)


@dataclass(frozen=True)
class Job:
    """One prompt of a request, waiting for its batch."""

    row: Row
    request: CompletionRequest


api = FastAPI(title="openllama", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def refused(_: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(HTTPException)
async def no_route(request: Request, error: HTTPException) -> JSONResponse:
    """FastAPI's own refusals (an unknown route, a wrong method) in OpenAI's shape."""
    message = (f"no route {request.method} {request.url.path}: this server answers GET /v1/models and "
               "POST /v1/completions (a base model: no chat template, so no /v1/chat/completions)")
    if error.status_code != 404:
        message = f"{request.method} {request.url.path}: {error.detail}"
    return JSONResponse(ApiError(message, status=error.status_code).body(), status_code=error.status_code)


@serve.deployment(name="CompletionServer")
@serve.ingress(api)
class CompletionServer:
    """One replica: the model, the batched decoder, the routes."""

    def __init__(self, settings: ServeConfig, api_key_digest: str | None) -> None:
        self.model = ServedModel.load(settings.name, settings.source, settings.dtype, settings.tokenizer)
        self.api_key_digest = api_key_digest
        self.decode.set_max_batch_size(settings.max_batch_size)
        self.decode.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)

    def authorize(self, request: Request) -> None:
        """Refuse (401) a request without `Authorization: Bearer KEY` when the server has a key."""
        if self.api_key_digest is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key_digest(key.strip()), self.api_key_digest):
            raise ApiError("a valid API key is required: send the header `Authorization: Bearer KEY` (the server's "
                           "OPENLLAMA_API_KEY)", status=401, code="invalid_api_key")

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self.authorize(request)
        return models_response(self.model.name, self.model.config.max_position_embeddings)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        self.authorize(request)
        model = self.model
        parsed = parse_request(await request.body(), model.name, model.tokenizer, model.config.vocab_size,
                               model.config.max_position_embeddings)
        streams = [self.decode(Job(row, parsed)) for row in parsed.rows()]
        ident = completion_id()
        if parsed.stream:
            return StreamingResponse(self.events(ident, parsed, streams), media_type="text/event-stream")
        answers = await asyncio.gather(*(self.collect(stream) for stream in streams))
        body = completion_response(ident, parsed, [delta for _, delta in answers])
        return JSONResponse(body, headers={BATCH_ROWS_HEADER: str(max(rows for rows, _ in answers))})

    @staticmethod
    async def collect(stream: AsyncIterator[tuple[int, Delta]]) -> tuple[int, Delta]:
        """A prompt's deltas as one, with the rows of the batch it was decoded in."""
        whole, shared = Delta(), 0
        async for rows, delta in stream:
            whole.merge(delta)
            shared = max(shared, rows)
        return shared, whole

    @staticmethod
    async def events(ident: str, request: CompletionRequest,
                     streams: list[AsyncIterator[tuple[int, Delta]]]) -> AsyncIterator[str]:
        """Server-sent events: each prompt's deltas as they come (tagged with its index), then `[DONE]`."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: AsyncIterator[tuple[int, Delta]]) -> None:
            try:
                async for _, delta in stream:
                    await queue.put((index, delta))
                await queue.put((index, None))
            except Exception as error:  # handed to the response, which then ends
                await queue.put((index, error))

        tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
        generated, open_streams = 0, len(tasks)
        while open_streams:
            index, delta = await queue.get()
            if isinstance(delta, Exception):
                raise delta
            if delta is None:
                open_streams -= 1
                continue
            generated += delta.tokens
            if delta.text or delta.finish_reason or (delta.logprobs and delta.logprobs["tokens"]):
                yield stream_event(ident, request.model, [choice(index, delta)])
        if request.include_usage:
            yield stream_event(ident, request.model, [], usage(request, generated))
        yield STREAM_END

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def decode(self, jobs: list[Job]) -> AsyncIterator[list[tuple[int, Delta] | type[StopIteration]]]:
        """The rows of one batch decoded together; yields, per row, its next delta (or StopIteration once it
        has ended) each time the decoder hands back tokens. The device work runs in a thread, so the replica
        goes on taking requests meanwhile."""
        model = self.model
        batch = await asyncio.to_thread(RowBatch, model.params, model.config, model.runtime,
                                        [job.row for job in jobs], score_prompts=any(j.request.scores_prompt
                                                                                     for j in jobs))
        answers = [
            Completion(model.tokenizer, job.row.prompt, job.row.max_new_tokens, job.request.stop, job.request.echo,
                       job.request.logprobs, batch.prompt_scores[i] if batch.prompt_scores else None)
            for i, job in enumerate(jobs)
        ]
        ended = [False] * len(jobs)
        while not all(ended):
            new = await asyncio.to_thread(batch.advance, STEPS_PER_CALL)
            done = batch.done
            out: list[tuple[int, Delta] | type[StopIteration]] = []
            for i, answer in enumerate(answers):
                if ended[i]:
                    out.append(StopIteration)
                    continue
                delta = answer.add(new[i], done[i])
                if delta.finish_reason is not None:
                    ended[i] = True
                    if not done[i]:
                        batch.stop(i)  # a stop string: the row needs no more tokens
                out.append((len(jobs), delta))
            yield out


def deployment(settings: ServeConfig, api_key: str | None) -> serve.Application:
    """The application of `settings` (its source where replicas read it, its name given, no key in it)."""
    options: dict[str, Any] = {"num_cpus": settings.num_cpus}
    if settings.num_gpus:
        options["num_gpus"] = settings.num_gpus
    if registry.parse_model_uri(settings.source) and tracking.tracking_uri():
        options["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": tracking.tracking_uri()}}
    return CompletionServer.options(
        num_replicas=settings.replicas, ray_actor_options=options, max_ongoing_requests=4 * settings.max_batch_size,
    ).bind(settings, key_digest(api_key) if api_key else None)
