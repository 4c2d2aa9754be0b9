"""The Ray Serve deployment behind `openllama serve`: OpenAI's routes over one model and its batched decoder.

Each replica loads the model once (`ServedModel`) and answers `GET /v1/models` and `POST /v1/completions`
(the protocol is `eval/completions.py`). Every prompt of every request becomes one row of `decode.RowBatch`,
and one scheduler task per replica decodes them with continuous batching: the rows that arrive within
`batch_wait_ms` of the first (up to `max_batch_size`) start a batch, and every few tokens (`STEPS_PER_CALL`)
the rows that arrived meanwhile take the slots of rows that ended, while the others go on. Each row's text
is handed back as it comes, so a stream and a whole response are the same decode. A batch grows to
`max_batch_size` slots when more rows wait than it has free; a row whose prompt and budget do not fit the
batch's cache waits (and so do the rows after it) until the batch ends, and starts the next. Each response
says how many rows shared its decode at most (`openllama-batch-rows`).

Every refusal is OpenAI's error object: 400 for a request that cannot be served, 401 without the API key when
one is set, 404 for a route there is not; the replica goes on serving. This module imports Ray Serve, so only
what runs the server imports it (`eval/serve.py`, after Ray is set up). No `from __future__ import
annotations` here: FastAPI reads the routes' annotations (`Request`) as objects.
"""

import asyncio
import collections
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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


@dataclass
class Job:
    """One prompt of a request: waiting for a slot, then decoding; its deltas go to `out` as they come."""

    row: Row
    request: CompletionRequest
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # (rows sharing the decode, Delta); then None
    abandoned: bool = False  # the client went away: its row stops at the next call


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
        self.max_batch_size = settings.max_batch_size
        self.batch_wait_s = settings.batch_wait_ms / 1000
        self.waiting: collections.deque[Job] = collections.deque()
        self.arrived: asyncio.Event | None = None  # made in the replica's event loop, by the first request
        self.scheduler: asyncio.Task | None = None

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

    async def decode(self, job: Job) -> AsyncIterator[tuple[int, Delta]]:
        """`job`'s deltas as the scheduler decodes them, with how many rows shared the decode."""
        if self.scheduler is None or self.scheduler.done():
            self.arrived = asyncio.Event()
            self.scheduler = asyncio.create_task(self.schedule())
        self.waiting.append(job)
        self.arrived.set()
        try:
            while (item := await job.out.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            job.abandoned = True

    async def schedule(self) -> None:
        """Forever: wait for rows, let a batch window gather more, decode them with those that join."""
        while True:
            while not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
            deadline = asyncio.get_running_loop().time() + self.batch_wait_s
            while len(self.waiting) < self.max_batch_size:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), left)
                except TimeoutError:
                    break
            jobs = [self.waiting.popleft() for _ in range(min(self.max_batch_size, len(self.waiting)))]
            await self.run_batch(jobs)

    async def run_batch(self, jobs: list[Job]) -> None:
        """`jobs` decoded together until every row has ended, rows that arrive meanwhile joining freed slots. A
        failed decode fails the requests it was decoding, never the replica."""
        model = self.model
        active: dict[int, tuple[Job, Completion]] = {}
        unfinished = list(jobs)
        try:
            batch = await asyncio.to_thread(RowBatch, model.params, model.config, model.runtime,
                                            [job.row for job in jobs],
                                            score_prompts=any(job.request.scores_prompt for job in jobs))
            self.start(active, list(range(len(jobs))), jobs, batch.prompt_scores)
            while active:
                if len(active) + len(self.waiting) > batch.slots and batch.slots < self.max_batch_size:
                    await asyncio.to_thread(batch.grow, self.max_batch_size)  # to the top: few shapes
                free = [slot for slot in range(batch.slots) if slot not in active]
                joining = []
                while len(joining) < len(free) and self.waiting and batch.fits(self.waiting[0].row):
                    joining.append(self.waiting.popleft())
                if joining:
                    unfinished += joining
                    scores = await asyncio.to_thread(batch.admit, [job.row for job in joining],
                                                     free[: len(joining)],
                                                     any(job.request.scores_prompt for job in joining))
                    self.start(active, free[: len(joining)], joining, scores)
                new = await asyncio.to_thread(batch.advance, STEPS_PER_CALL)
                done, shared = batch.done, len(active)
                for slot, (job, answer) in list(active.items()):
                    ended = job.abandoned
                    if not ended:
                        delta = answer.add(new[slot], done[slot])
                        job.out.put_nowait((shared, delta))
                        ended = delta.finish_reason is not None
                    if ended:
                        if not done[slot]:
                            batch.stop(slot)  # a stop string, or the client left: the row needs no more tokens
                        job.out.put_nowait(None)
                        unfinished.remove(job)
                        del active[slot]
        except Exception as error:
            log.exception("a batch failed; its %d unfinished requests fail with it", len(unfinished))
            for job in unfinished:
                job.out.put_nowait(error)

    def start(self, active: dict[int, tuple[Job, Completion]], slots: list[int], jobs: list[Job],
              prompt_scores: list) -> None:
        """Follow each of `jobs`, whose rows now decode in `slots`."""
        tokenizer = self.model.tokenizer
        for i, (slot, job) in enumerate(zip(slots, jobs, strict=True)):
            request = job.request
            active[slot] = (job, Completion(tokenizer, job.row.prompt, job.row.max_new_tokens, request.stop,
                                            request.echo, request.logprobs,
                                            prompt_scores[i] if prompt_scores else None))


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
