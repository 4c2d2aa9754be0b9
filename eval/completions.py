"""OpenAI's completions API over the one decoder: what `openllama serve` accepts, answers and refuses.

Free of Ray and HTTP, so that the protocol reads (and is tested) on its own; `eval/serve.py` puts it behind
Ray Serve. `parse_request` turns a request body into checked prompts and settings, or raises `ApiError`
(HTTP 400 with OpenAI's error object, naming the field). `Completion` follows one prompt through decoding:
its text (the prompt first when echoed), cut before the first stop string, and its `logprobs` entries, handed
out as `Delta`s that never take back what they gave, so a stream and a whole response say the same.

- Prompts: a string, a list of strings, a list of token ids or a list of such lists. A string is encoded by
  the checkpoint's SentencePiece model with BOS first, as `openllama generate` and eval do; token ids are
  used exactly as given.
- Text: the continuation is decoded together with the prompt (SentencePiece spaces a piece by what is before
  it), and bytes of a character not yet complete are held back, as `openllama generate` prints.
- `logprobs`: each token's log-probability under the model (before temperature and top-p), and at each
  position the `logprobs` most likely tokens plus the chosen one; a token's entry in `tokens` is the text it
  adds, and `text_offset` is where that text starts in the choice's `text`. With `echo` the prompt's tokens
  come first, the first of them without a log-probability (nothing precedes it), which is how lm-eval's
  `local-completions` model scores a context and continuation (`echo`, `logprobs`, `max_tokens` 0 or 1).
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import sentencepiece as spm

from openllama.eval.decode import TOP_LOGPROBS, Row, Scored

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_STOP_STRINGS = 4  # as OpenAI allows
# settings OpenAI's completions take that this server does not implement, with the value that means "off"
UNSUPPORTED = {"n": 1, "best_of": 1, "suffix": None, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}


class ApiError(Exception):
    """A request the server refuses, as OpenAI reports it: an HTTP status and `{"error": {...}}`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    """A checked `POST /v1/completions` body: token prompts and the settings every prompt shares."""

    model: str
    prompts: list[list[int]]
    max_tokens: list[int]  # per prompt (null in the request: all the context the prompt leaves)
    temperature: float = 1.0  # OpenAI's default; 0 is greedy
    top_p: float = 1.0
    seed: int = 0  # the request's, or drawn for it
    stop: tuple[str, ...] = ()
    echo: bool = False
    logprobs: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts

    def rows(self) -> list[Row]:
        """Each prompt as a row of the decoder, with this request's settings."""
        return [Row(prompt, budget, self.temperature, self.top_p, self.seed)
                for prompt, budget in zip(self.prompts, self.max_tokens, strict=True)]

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompts' own tokens are scored (echoed with logprobs)."""
        return self.echo and self.logprobs is not None


TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
              dict: "an object"}


def _get(data: dict, name: str, kinds: tuple[type, ...], default: Any = None, nullable: bool = True) -> Any:
    """`data[name]` if it is of one of `kinds` (a bool is not a number), else an ApiError naming it."""
    value = data.get(name, default)
    if value is None and nullable:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = [TYPE_NAMES[kind] for kind in kinds if not (kind is int and float in kinds)]  # 3 is a number too
        raise ApiError(f"{name} must be {' or '.join(names)}, not {json.dumps(value)[:80]}", name)
    return value


def _token_prompt(value: list, where: str, vocabulary: int) -> list[int]:
    if not value:
        raise ApiError(f"{where} is an empty list of token ids", "prompt")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocabulary for t in value):
        raise ApiError(f"{where} must hold token ids, integers in [0, {vocabulary})", "prompt")
    return list(value)


def _prompts(value: Any, sp: spm.SentencePieceProcessor, vocabulary: int) -> list[list[int]]:
    """The request's prompt (any of OpenAI's four forms) as token lists."""
    if value is None:
        raise ApiError("prompt is required: a string, a list of strings or a list of token ids", "prompt")
    if isinstance(value, str):
        return [[sp.bos_id(), *sp.encode(value)]]
    if not isinstance(value, list) or not value:
        raise ApiError("prompt must be a string, a list of strings, a list of token ids or a list of such "
                       f"lists, not {json.dumps(value)[:80]}", "prompt")
    if all(isinstance(p, str) for p in value):
        return [[sp.bos_id(), *sp.encode(p)] for p in value]
    if all(isinstance(p, list) for p in value):
        return [_token_prompt(p, f"prompt[{i}]", vocabulary) for i, p in enumerate(value)]
    return [_token_prompt(value, "prompt", vocabulary)]


def parse_request(body: bytes, served: str, sp: spm.SentencePieceProcessor, vocab_size: int,
                  context: int) -> CompletionRequest:
    """A checked completions request for model `served` with `context` positions, or the ApiError naming
    what is wrong with it."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(f"the request body is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ApiError("the request body must be a JSON object")
    model = _get(data, "model", (str,))
    if model is None:
        raise ApiError(f"model is required; this server serves {served!r}", "model")
    if model != served:
        raise ApiError(f"the model {model!r} does not exist; this server serves {served!r}", "model",
                       code="model_not_found")
    for name, off in UNSUPPORTED.items():
        if data.get(name, off) not in (off, None):
            raise ApiError(f"{name}={json.dumps(data[name])} is not supported by this server (only {json.dumps(off)})",
                           name)
    prompts = _prompts(data.get("prompt"), sp, min(vocab_size, sp.get_piece_size()))
    max_tokens = _get(data, "max_tokens", (int,), DEFAULT_MAX_TOKENS)
    if max_tokens is not None and max_tokens < 0:
        raise ApiError(f"max_tokens={max_tokens} must be 0 or more", "max_tokens")
    budgets = []
    for i, prompt in enumerate(prompts):
        budget = context - len(prompt) if max_tokens is None else max_tokens
        if len(prompt) + budget > context or len(prompt) > context:
            which = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            raise ApiError(f"this model's maximum context length is {context} tokens, but {which} has {len(prompt)} "
                           f"tokens and max_tokens is {budget}: {len(prompt) + budget} in all; shorten the prompt "
                           "or lower max_tokens", "max_tokens" if len(prompt) <= context else "prompt",
                           code="context_length_exceeded")
        budgets.append(budget)
    temperature = _get(data, "temperature", (float, int), 1.0)
    temperature = 1.0 if temperature is None else float(temperature)
    if not 0 <= temperature <= 2:
        raise ApiError(f"temperature={temperature} must be in [0, 2] (0: greedy)", "temperature")
    top_p = _get(data, "top_p", (float, int), 1.0)
    top_p = 1.0 if top_p is None else float(top_p)
    if not 0 < top_p <= 1:
        raise ApiError(f"top_p={top_p} must be in (0, 1]", "top_p")
    seed = _get(data, "seed", (int,))
    stop = _get(data, "stop", (str, list))
    stop = [stop] if isinstance(stop, str) else stop or []
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    logprobs = _get(data, "logprobs", (int,))
    if logprobs is not None and not 0 <= logprobs <= TOP_LOGPROBS:
        raise ApiError(f"logprobs={logprobs} must be in [0, {TOP_LOGPROBS}]", "logprobs")
    stream_options = _get(data, "stream_options", (dict,)) or {}
    return CompletionRequest(
        model=model, prompts=prompts, max_tokens=budgets, temperature=temperature, top_p=top_p,
        seed=secrets.randbits(32) if seed is None else seed, stop=tuple(stop),
        echo=bool(_get(data, "echo", (bool,), False)), logprobs=logprobs,
        stream=bool(_get(data, "stream", (bool,), False)),
        include_usage=bool(_get(stream_options, "include_usage", (bool,), False)),
    )


# ------------------------------------------------------------------------------------------ one prompt

BYTE_PIECE = re.compile(r"^<0x([0-9A-F]{2})>$")


def piece_text(sp: spm.SentencePieceProcessor, token: int) -> str:
    """A token's text on its own, for `top_logprobs`: the piece with its spaces, a byte piece as its character
    (ASCII) or as OpenAI writes bytes that are no text alone (`bytes:\\xe2`)."""
    piece = sp.id_to_piece(token)
    byte = BYTE_PIECE.match(piece)
    if byte is None:
        return "" if sp.is_control(token) else piece.replace("\u2581", " ")
    value = int(byte.group(1), 16)
    return chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"



@dataclass
class Delta:
    """What one prompt's answer gained since the last delta: text, logprobs entries, the end."""

    text: str = ""
    logprobs: dict[str, list] | None = None  # tokens, token_logprobs, top_logprobs, text_offset (when asked)
    finish_reason: str | None = None  # "stop" (a stop token or string) or "length" (max_tokens), once ended
    tokens: int = 0  # generated tokens it covers, for `usage`

    def merge(self, later: Delta) -> None:
        """This delta followed by `later`, as one."""
        self.text += later.text
        if self.logprobs is None:
            self.logprobs = later.logprobs
        elif later.logprobs is not None:
            self.logprobs = {key: values + later.logprobs[key] for key, values in self.logprobs.items()}
        self.finish_reason = later.finish_reason or self.finish_reason
        self.tokens += later.tokens


@dataclass
class Entry:
    """One token of a choice's `logprobs`: the text it adds, where that starts, its scores."""

    text: str
    offset: int  # in the decoded prompt + continuation
    logprob: float | None
    top: dict[str, float] | None


@dataclass
class Completion:
    """One prompt's answer, followed token by token; `add` returns each Delta to send."""

    sp: spm.SentencePieceProcessor
    prompt: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    echo: bool = False
    logprobs: int | None = None
    prompt_scores: list[Scored] | None = None  # the prompt's tokens after the first (scored when echoed)
    ids: list[int] = field(init=False, default_factory=list)
    full: str = field(init=False, default="")  # prompt + continuation decoded, up to its last whole character
    entries: list[Entry] = field(init=False, default_factory=list)  # what `logprobs` reports, in order
    generated: int = field(init=False, default=0)
    end: int | None = field(init=False, default=None)  # where the text ends in `full`, once it has ended
    finish_reason: str | None = field(init=False, default=None)
    shown: int = field(init=False, default=0)  # how much of `full` was handed out
    entries_sent: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.echo and self.logprobs is not None and self.prompt_scores is not None:
            for token, scored in zip(self.prompt, [None, *self.prompt_scores], strict=True):
                self._append(token, scored)
        else:
            self.ids, self.full = list(self.prompt), self.sp.decode(self.prompt)
        self.prompt_text = self.full
        self.base = 0 if self.echo else len(self.prompt_text)  # where the choice's text starts in `full`
        self.shown = self.base

    def _append(self, token: int, scored: Scored | None) -> None:
        """`token` added to the text; a character's bytes show once it is complete (as TextStream prints)."""
        self.ids.append(token)
        text = self.sp.decode(self.ids)
        start = len(self.full)
        if not text.endswith("\ufffd"):
            self.full = text
        if self.logprobs is not None:
            entry = Entry(self.full[start:], start, None, None)
            if scored is not None:
                entry.logprob = scored.logprob
                entry.top = {piece_text(self.sp, t): p for t, p in scored.top[: self.logprobs]}
                entry.top[entry.text] = scored.logprob  # the chosen token is always among them
            self.entries.append(entry)

    def add(self, tokens: list[Scored], ended: bool) -> Delta:
        """The delta after the decoder added `tokens` to this prompt's row; `ended`: the row is done."""
        for scored in tokens:
            self._append(scored.token, scored)
        self.generated += len(tokens)
        continuation = self.full[len(self.prompt_text):]
        found = [continuation.find(s) for s in self.stop if s in continuation]
        if found:
            self.end, self.finish_reason = len(self.prompt_text) + min(found), "stop"
        elif ended:  # by the stop token (its text is empty), or after max_tokens
            self.end = len(self.full)
            by_stop_token = bool(tokens) and tokens[-1].token == self.sp.eos_id()
            self.finish_reason = "length" if self.generated >= self.max_tokens and not by_stop_token else "stop"
        shown = self.end if self.end is not None else len(self.full) - self._held_back(continuation)
        delta = Delta(self.full[self.shown:shown], finish_reason=self.finish_reason, tokens=len(tokens))
        self.shown = max(self.shown, shown)
        if self.logprobs is not None:
            ready = []
            for entry in self.entries[self.entries_sent:]:
                if self.end is not None:
                    ready += [entry] if entry.offset < self.end or not found else []  # none past a stop string
                elif entry.offset + len(entry.text) <= shown and (entry.text or entry.offset < shown):
                    ready.append(entry)
                else:
                    break
            self.entries_sent = len(self.entries) if self.end is not None else self.entries_sent + len(ready)
            delta.logprobs = {"tokens": [e.text for e in ready], "token_logprobs": [e.logprob for e in ready],
                              "top_logprobs": [e.top for e in ready],
                              "text_offset": [e.offset - self.base for e in ready]}
        return delta

    def _held_back(self, continuation: str) -> int:
        """How many trailing characters could begin a stop string, and so wait for the next tokens."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(continuation)), 0, -1)
                    if continuation.endswith(s[:n])), default=0)


# ------------------------------------------------------------------------------------------ responses


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def choice(index: int, delta: Delta) -> dict[str, Any]:
    return {"index": index, "text": delta.text, "logprobs": delta.logprobs, "finish_reason": delta.finish_reason}


def usage(request: CompletionRequest, generated: int) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in request.prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}


def completion_response(ident: str, request: CompletionRequest, deltas: list[Delta]) -> dict[str, Any]:
    """The whole answer: one choice per prompt, in the order of the prompts."""
    return {"id": ident, "object": "text_completion", "created": int(time.time()), "model": request.model,
            "choices": [choice(i, d) for i, d in enumerate(deltas)],
            "usage": usage(request, sum(d.tokens for d in deltas))}


def stream_event(ident: str, model: str, choices: list[dict], usage_counts: dict | None = None) -> str:
    """One server-sent event of a streamed completion."""
    chunk: dict[str, Any] = {"id": ident, "object": "text_completion", "created": int(time.time()), "model": model,
                             "choices": choices}
    if usage_counts is not None:
        chunk["usage"] = usage_counts
    return f"data: {json.dumps(chunk)}\n\n"


STREAM_END = "data: [DONE]\n\n"


def models_response(served: str, context: int) -> dict[str, Any]:
    """`GET /v1/models`: the one model this server serves."""
    return {"object": "list", "data": [{"id": served, "object": "model", "created": int(time.time()),
                                        "owned_by": "openllama", "max_model_len": context}]}
