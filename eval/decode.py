"""The one decoder: a jitted prefill of the prompt into the KV cache, then one jitted step per token.

Both `openllama generate` and lm-eval's `generate_until` (`backend.Scorer.generate`) decode here.
Batches: prompts of equal length run together (no padding between rows, so no attention mask is
needed); prompts of different lengths run as separate groups. A prompt is right-padded to a bucket length
(`packing.bucket_length`) so the prefill compiles for a few lengths, and the cache length is rounded so
the step compiles once for many. Without streaming, all decode steps run on device in one `while_loop`;
streaming (`on_token`, one prompt) brings each token to the host as it is made, and the callback may stop
the generation (lm-eval's `until` strings are found that way). Greedy by default; with temperature > 0,
nucleus sampling from explicit PRNG keys, so a seed reproduces the same text.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm

from openllama import commands, files
from openllama.config import POSITIONAL, ConfigError
from openllama.data.tokenizer import load_for_model
from openllama.eval.packing import bucket_length
from openllama.train import checkpoint
from openllama.train.model import Llama, LlamaConfig, ModelRuntime, init_cache

# how eval and generation run a checkpoint, whatever the run that trained it chose: float32 compute, the
# backend's own kernels, layer by layer (the KV cache is per layer); the weights keep the dtype they were saved in
RUNTIME = ModelRuntime()
CACHE_ROUNDING = 128  # cache lengths are rounded up so the decode step compiles once for many lengths

# sees each new token id as it is made; returning True stops the generation after that token
OnToken = Callable[[int], bool | None]


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Refuse decoding settings that cannot work, naming the setting (shared by `generate` and the CLI)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p} must be in (0, 1]")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 means greedy)")


def sample_next(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next token per row: argmax when temperature == 0, else a draw from the top-p nucleus."""

    def greedy() -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def nucleus() -> jax.Array:
        scaled = logits / temperature
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token while the probability mass before it is below top_p (the top token always stays)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, nucleus, greedy)


def _forward_and_sample(config: LlamaConfig, params: dict, ids: jax.Array, cache: list[dict], key: jax.Array,
                        temperature: jax.Array, top_p: jax.Array) -> tuple[jax.Array, list[dict]]:
    """Run `ids` [batch, seq] through the model on top of `cache`; sample the token after the last one."""
    logits, cache = Llama(config, RUNTIME).apply({"params": params}, ids, cache=cache)
    return sample_next(logits[:, -1], key, temperature, top_p), cache


_step = jax.jit(_forward_and_sample, static_argnums=0)  # one streamed step ([batch, 1])


@partial(jax.jit, static_argnums=0)
def _prefill(config: LlamaConfig, params: dict, padded: jax.Array, length: jax.Array, cache: list[dict],
             key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> tuple[jax.Array, list[dict]]:
    """Fill the cache with prompts right-padded to [batch, bucket]; sample the token after the first `length`.

    Setting the cache index back to `length` makes the first generated token overwrite the padding, and
    the causal mask never lets a query see keys beyond its own position, so the padding is never read.
    The output layer runs at the last prompt position only.
    """
    model = Llama(config, RUNTIME)
    hidden, cache = model.apply({"params": params}, padded, cache=cache, method=Llama.hidden_states)
    logits = model.apply({"params": params}, hidden[:, length - 1], method=Llama.logits)
    cache = [dict(layer, index=length) for layer in cache]
    return sample_next(logits, key, temperature, top_p), cache


@partial(jax.jit, static_argnums=(0, 7, 8))
def _decode_on_device(config: LlamaConfig, params: dict, token: jax.Array, cache: list[dict], key: jax.Array,
                      temperature: jax.Array, top_p: jax.Array, max_new_tokens: int,
                      stop_ids: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """All decode steps in one `while_loop` (no host round trip per token); ends early once every row stopped.

    Returns the tokens [batch, max_new_tokens] (valid up to the step count) and the step count.
    """
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    tokens = jnp.zeros((token.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(token)

    def running(state: tuple) -> jax.Array:
        step, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_token(state: tuple) -> tuple:
        step, token, cache, done, tokens = state
        token, cache = _forward_and_sample(config, params, token[:, None], cache, jax.random.fold_in(key, step),
                                           temperature, top_p)
        return step + 1, token, cache, done | jnp.isin(token, stops), tokens.at[:, step].set(token)

    state = (jnp.int32(1), token, cache, jnp.isin(token, stops), tokens)
    steps, _, _, _, tokens = jax.lax.while_loop(running, one_token, state)
    return tokens, steps


def _until_stop(tokens: list[int], stop_ids: Sequence[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


def _generate_group(params: dict, config: LlamaConfig, prompts: np.ndarray, max_new_tokens: int,
                    temperature: float, top_p: float, key: jax.Array, stop_ids: tuple[int, ...],
                    on_token: OnToken | None) -> list[list[int]]:
    batch, prompt_len = prompts.shape
    cache_length = -(-(prompt_len + max_new_tokens) // CACHE_ROUNDING) * CACHE_ROUNDING
    padded = np.zeros((batch, bucket_length(prompt_len, cache_length)), np.int32)
    padded[:, :prompt_len] = prompts
    cache = init_cache(config, RUNTIME, batch, cache_length)
    temperature, top_p = jnp.float32(temperature), jnp.float32(top_p)
    token, cache = _prefill(config, params, jnp.asarray(padded), jnp.int32(prompt_len), cache,
                            jax.random.fold_in(key, 0), temperature, top_p)
    if on_token is None:
        tokens, steps = _decode_on_device(config, params, token, cache, key, temperature, top_p,
                                          max_new_tokens, stop_ids)
        return [_until_stop(row, stop_ids) for row in np.asarray(tokens)[:, : int(steps)].tolist()]
    # streaming: one host round trip per token, so each can be shown (or checked) as it comes
    outputs: list[int] = []
    for step in range(1, max_new_tokens + 1):
        token_id = int(token[0])
        if token_id in stop_ids:
            break
        outputs.append(token_id)
        if on_token(token_id) or step == max_new_tokens:
            break
        token, cache = _step(config, params, token[:, None], cache, jax.random.fold_in(key, step),
                             temperature, top_p)
    return [outputs]


def generate(
    params: dict,
    config: LlamaConfig,
    prompt_ids: list[list[int]] | list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    on_token: OnToken | None = None,
) -> list[list[int]] | list[int]:
    """New token ids for each prompt (a single prompt gives a single list), stop token excluded.

    Prompts must already start with BOS if the model expects it. `stop_ids` defaults to EOS; pass
    `()` to always produce `max_new_tokens`. `on_token` sees each new token as it comes (single prompt)
    and stops the generation after it by returning True.
    """
    single = bool(prompt_ids) and isinstance(prompt_ids[0], int)
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS)")
    if any(not 0 <= t < config.vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, vocab_size={config.vocab_size})")
    check_sampling(max_new_tokens, temperature, top_p)
    if on_token is not None and not single:
        raise ValueError("on_token streams one prompt at a time; pass a single prompt (a list of ids)")
    stop_ids = (config.eos_token_id,) if stop_ids is None else tuple(stop_ids)
    key = jax.random.PRNGKey(seed)
    results: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    for length, indices in sorted(by_length.items()):
        group = np.array([prompts[i] for i in indices], np.int32)
        outputs = _generate_group(params, config, group, max_new_tokens, temperature, top_p,
                                  jax.random.fold_in(key, length), stop_ids, on_token)
        for i, output in zip(indices, outputs, strict=True):
            results[i] = output
    return results[0] if single else results


# --- rows of any lengths decoded together (`openllama serve`) -------------------------------------------
# `generate` runs prompts of one length per group, since the cache has one write position for the batch. A
# server's concurrent requests rarely share a length, so here each row keeps its own cache position: the
# prefill runs the right-padded batch as `generate` does, then every decode step is the model applied to one
# row at a time under `jax.vmap`, which turns the position into one per row. Each row has its own sampling
# settings and token budget, and the same keys `generate` uses for its prompt and seed, so what a row decodes
# does not depend on the rows beside it.

TOP_LOGPROBS = 5  # the most likely tokens reported at each position (OpenAI's completions allow up to 5)


@dataclass(frozen=True)
class Row:
    """One prompt of a `RowBatch`, with its own settings (one prompt of a server's request)."""

    prompt: list[int]  # token ids, BOS first if the model expects it
    max_new_tokens: int  # 0: the prompt is only scored (`RowBatch(score_prompts=True)`)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0  # taken modulo 2**32


@dataclass(frozen=True)
class Scored:
    """A token, its log-probability under the model (before temperature and top-p) and the TOP_LOGPROBS most
    likely tokens at its position as (token, log-probability), most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def _scored(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per position: the log-probability of `tokens`, and the top TOP_LOGPROBS tokens and log-probabilities."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
    top_logprobs, top_tokens = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    return chosen, top_tokens, top_logprobs


def _sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """`sample_next` for each row [batch, vocab] with its own key and settings, as if it were alone. Under vmap
    its `cond` computes both branches, so the nucleus runs only when some row samples."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def drawn() -> jax.Array:
        sampled = jax.vmap(lambda row, *args: sample_next(row[None], *args)[0])(logits, keys, temperature, top_p)
        return jnp.where(temperature > 0, sampled, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), drawn, lambda: greedy)


def _row_step(config: LlamaConfig, runtime: ModelRuntime, params: dict, token: jax.Array,
              cache: list[dict]) -> tuple[jax.Array, list[dict]]:
    """The logits after one row's `token`, on top of that row's cache (its own position); vmapped over rows."""
    as_batch = [{"k": layer["k"][None], "v": layer["v"][None], "index": layer["index"]} for layer in cache]
    logits, as_batch = Llama(config, runtime).apply({"params": params}, token[None, None], cache=as_batch)
    return logits[0, -1], [{"k": layer["k"][0], "v": layer["v"][0], "index": layer["index"]} for layer in as_batch]


@partial(jax.jit, static_argnums=(0, 1, 2))
def _prefill_rows(config: LlamaConfig, runtime: ModelRuntime, score_prompts: bool, params: dict, padded: jax.Array,
                  lengths: jax.Array, cache: list[dict], keys: jax.Array, temperature: jax.Array,
                  top_p: jax.Array) -> tuple:
    """`_prefill` for rows of their own lengths: each row's first token from its own last prompt position, and
    its cache position set to its length; with `score_prompts`, every prompt token scored given those before."""
    model = Llama(config, runtime)
    hidden, cache = model.apply({"params": params}, padded, cache=cache, method=Llama.hidden_states)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = model.apply({"params": params}, last, method=Llama.logits)
    token = _sample_rows(logits, jax.vmap(jax.random.fold_in)(keys, jnp.zeros_like(lengths)), temperature, top_p)
    prompt = None
    if score_prompts:
        prompt = _scored(model.apply({"params": params}, hidden[:, :-1], method=Llama.logits), padded[:, 1:])
    return token, _scored(logits, token), prompt, [dict(layer, index=lengths) for layer in cache]


@partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _advance_rows(config: LlamaConfig, runtime: ModelRuntime, steps: int, stop_ids: tuple[int, ...], params: dict,
                  state: dict) -> tuple:
    """Up to `steps` decode steps of every row on device, fewer once every row is done.

    Returns the new state and, per row and step, the token, its scores and whether it belongs to the row's
    output (what a row makes once it is done does not; the stop token that ends it does).
    """
    rows = state["token"].shape[0]
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    step_of_rows = jax.vmap(partial(_row_step, config, runtime), in_axes=(None, 0, 0))
    out = {"token": jnp.zeros((rows, steps), jnp.int32), "logprob": jnp.zeros((rows, steps), jnp.float32),
           "top_tokens": jnp.zeros((rows, steps, TOP_LOGPROBS), jnp.int32),
           "top_logprobs": jnp.zeros((rows, steps, TOP_LOGPROBS), jnp.float32),
           "emitted": jnp.zeros((rows, steps), bool)}

    def running(carry: tuple) -> jax.Array:
        step, state, _ = carry
        return (step < steps) & ~jnp.all(state["done"])

    def one_token(carry: tuple) -> tuple:
        step, state, out = carry
        logits, cache = step_of_rows(params, state["token"], state["cache"])
        keys = jax.vmap(jax.random.fold_in)(state["keys"], state["produced"])
        token = _sample_rows(logits, keys, state["temperature"], state["top_p"])
        logprob, top_tokens, top_logprobs = _scored(logits, token)
        emitted = ~state["done"]
        produced = state["produced"] + emitted
        done = state["done"] | jnp.isin(token, stops) | (produced >= state["max_new_tokens"])
        state = dict(state, token=token, cache=cache, produced=produced, done=done)
        new = {"token": token, "logprob": logprob, "top_tokens": top_tokens, "top_logprobs": top_logprobs,
               "emitted": emitted}
        out = {name: out[name].at[:, step].set(value) for name, value in new.items()}
        return step + 1, state, out

    steps_run, state, out = jax.lax.while_loop(running, one_token, (jnp.int32(0), state, out))
    return state, out, steps_run


class RowBatch:
    """Rows of any lengths decoded together: the prefill on creation, then `advance` a few tokens at a time,
    with new rows `admit`ted into the slots of rows that ended while the others go on (continuous batching).

    Every row stops at a stop token (its last token then: OpenAI's logprobs report it, its text is empty),
    after its `max_new_tokens`, or when the caller `stop`s it (a stop string found in its text). Slots and
    cache positions are padded to powers of two (the prompts to their bucket, as in `generate`), so a server
    compiles few shapes whatever its requests. A row joins only where its prompt and budget fit the cache.
    """

    def __init__(self, params: dict, config: LlamaConfig, runtime: ModelRuntime, rows: Sequence[Row],
                 stop_ids: Sequence[int] | None = None, score_prompts: bool = False, slots: int = 1) -> None:
        if not rows:
            raise ValueError("a RowBatch needs at least one row")
        self.params, self.config, self.runtime = params, config, runtime
        self.stop_ids = (config.eos_token_id,) if stop_ids is None else tuple(stop_ids)
        self._check(rows)
        self.slots = 1 << (max(len(rows), slots) - 1).bit_length()
        longest = int(max(len(row.prompt) + row.max_new_tokens for row in rows))
        self.cache_length = max(CACHE_ROUNDING, 1 << (longest - 1).bit_length())
        self.state, first, prompt_scores = self._prefill(rows, score_prompts, self.slots)
        self.first: dict[int, list[Scored]] = dict(enumerate(first[: len(rows)]))  # handed out by `advance`
        self.prompt_scores = prompt_scores  # per row, its prompt tokens after the first (score_prompts)

    def _check(self, rows: Sequence[Row]) -> None:
        for row in rows:
            if not row.prompt or any(not 0 <= t < self.config.vocab_size for t in row.prompt):
                raise ValueError(f"every prompt needs 1 or more token ids in [0, vocab_size={self.config.vocab_size})")
            if row.max_new_tokens < 0:
                raise ValueError(f"max_new_tokens={row.max_new_tokens} must be at least 0")
            check_sampling(max(row.max_new_tokens, 1), row.temperature, row.top_p)

    def _prefill(self, rows: Sequence[Row], score_prompts: bool, slots: int) -> tuple:
        """The decode state of `rows` padded to `slots` (fillers: done at once), their first tokens, and their
        prompts' scores when asked for."""
        config = self.config
        filler = Row([config.bos_token_id], 0)
        padded_rows = [*rows, *[filler] * (slots - len(rows))]
        lengths = np.array([len(row.prompt) for row in padded_rows], np.int32)
        padded = np.zeros((slots, bucket_length(int(lengths.max()), self.cache_length)), np.int32)
        for i, row in enumerate(padded_rows):
            padded[i, : len(row.prompt)] = row.prompt
        # the keys `generate` gives a prompt of this length and seed
        keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(row.seed % 2**32), len(row.prompt))
                          for row in padded_rows])
        temperature = jnp.asarray([row.temperature for row in padded_rows], jnp.float32)
        top_p = jnp.asarray([row.top_p for row in padded_rows], jnp.float32)
        max_new = jnp.asarray([row.max_new_tokens for row in padded_rows], jnp.int32)
        cache = init_cache(config, self.runtime, slots, self.cache_length)
        token, first, prompt, cache = _prefill_rows(config, self.runtime, score_prompts, self.params,
                                                    jnp.asarray(padded), jnp.asarray(lengths), cache, keys,
                                                    temperature, top_p)
        emitted = max_new > 0
        produced = emitted.astype(jnp.int32)
        stopped = jnp.isin(token, jnp.asarray(self.stop_ids or (-1,), jnp.int32))
        state = {"token": token, "cache": cache, "keys": keys, "temperature": temperature, "top_p": top_p,
                 "max_new_tokens": max_new, "produced": produced, "done": stopped | (produced >= max_new)}
        firsts = self._rows_of({"token": token[:, None], "logprob": first[0][:, None], "top_tokens": first[1][:, None],
                                "top_logprobs": first[2][:, None], "emitted": emitted[:, None]}, 1)
        prompt_scores: list[list[Scored]] = []
        if prompt is not None:
            chosen, top_tokens, top_logprobs = (np.asarray(a) for a in prompt)
            prompt_scores = [
                [Scored(int(padded[i, j + 1]), float(chosen[i, j]), self._top(top_tokens[i, j], top_logprobs[i, j]))
                 for j in range(len(rows[i].prompt) - 1)]
                for i in range(len(rows))
            ]
        return state, firsts, prompt_scores

    @property
    def done(self) -> list[bool]:
        """Per slot, whether its row has ended (a stop token, its token budget, or `stop`), or it has none."""
        return np.asarray(self.state["done"]).tolist()

    def fits(self, row: Row) -> bool:
        """Whether `row`'s prompt and token budget fit this batch's cache."""
        return len(row.prompt) + row.max_new_tokens <= self.cache_length

    def admit(self, rows: Sequence[Row], slots: Sequence[int],
              score_prompts: bool = False) -> list[list[Scored]]:
        """Start `rows` in `slots` (of rows that are done, which the caller is finished with): their prefill
        now, their first tokens at the next `advance`. Returns their prompts' scores when asked for."""
        done = self.done
        if len(rows) != len(slots) or any(not done[slot] for slot in slots) or not all(map(self.fits, rows)):
            raise ValueError("admit needs as many free slots as rows, and rows that fit the cache")
        self._check(rows)
        padded = 1 << (len(rows) - 1).bit_length()
        state, first, prompt_scores = self._prefill(rows, score_prompts, padded)
        # the fillers' slot is past the end, so their writes are dropped: one shape per padded size
        targets = np.full(padded, self.slots, np.int32)
        targets[: len(slots)] = slots
        self.state = _place(self.state, state, jnp.asarray(targets))
        self.first.update(zip(slots, first, strict=False))
        return prompt_scores

    def grow(self, slots: int) -> None:
        """Room for more rows: `slots` in all (rounded up to a power of two), the new ones free."""
        slots = 1 << (slots - 1).bit_length()
        if slots > self.slots:
            self.state = _grow(self.state, slots - self.slots)
            self.slots = slots

    def stop(self, slot: int) -> None:
        """End the row in `slot` now, e.g. once its text holds a stop string."""
        self.state["done"] = self.state["done"].at[slot].set(True)

    def advance(self, steps: int) -> list[list[Scored]]:
        """Per slot, the tokens its row added in up to `steps` more decode steps, after the token its prefill
        chose if this is the first call since it started; empty lists for slots that are done."""
        new: list[list[Scored]] = [[] for _ in range(self.slots)]
        if not all(self.done):
            self.state, out, steps_run = _advance_rows(self.config, self.runtime, steps, self.stop_ids,
                                                       self.params, self.state)
            new = self._rows_of(out, int(steps_run))
        first, self.first = self.first, {}
        return [first.get(slot, []) + tokens for slot, tokens in enumerate(new)]

    def _rows_of(self, out: dict, steps: int) -> list[list[Scored]]:
        host = {name: np.asarray(value)[:, :steps] for name, value in out.items()}
        return [
            [Scored(int(host["token"][i, s]), float(host["logprob"][i, s]),
                    self._top(host["top_tokens"][i, s], host["top_logprobs"][i, s]))
             for s in range(steps) if host["emitted"][i, s]]
            for i in range(host["token"].shape[0])
        ]

    @staticmethod
    def _top(tokens: np.ndarray, logprobs: np.ndarray) -> list[tuple[int, float]]:
        return [(int(t), float(p)) for t, p in zip(tokens, logprobs, strict=True)]


@partial(jax.jit, static_argnums=(1,))
def _grow(state: dict, more: int) -> dict:
    """`state` with `more` free slots after its own: rows that are done, with empty caches."""
    def pad(name: str, value: jax.Array) -> jax.Array:
        extra = jnp.full((more, *value.shape[1:]), name == "done", value.dtype)
        return jnp.concatenate([value, extra])

    cache = [{key: pad(key, value) for key, value in layer.items()} for layer in state["cache"]]
    return {**{name: pad(name, value) for name, value in state.items() if name != "cache"}, "cache": cache}


@partial(jax.jit, donate_argnums=(0,))
def _place(state: dict, rows: dict, slots: jax.Array) -> dict:
    """`state` with row i of `rows` written into slot `slots[i]`, and not at all where that is past the end
    (every array's leading axis is the slot; a cache's per-row position too)."""
    return jax.tree.map(lambda whole, part: whole.at[slots].set(part, mode="drop"), state, rows)


class TextStream:
    """Prints a continuation as tokens arrive, holding back bytes of a character not yet complete.

    Decoding prompt + continuation together keeps SentencePiece's spacing right at the boundary.
    """

    def __init__(self, sp: spm.SentencePieceProcessor, prompt_ids: list[int], out: TextIO | None = None) -> None:
        self.sp, self.ids, self.out = sp, list(prompt_ids), out or sys.stdout
        self.printed = len(sp.decode(self.ids))
        self.continuation = ""  # everything written so far

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.sp.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence of byte-fallback pieces
            return
        self.write(text[self.printed:])
        self.printed = len(text)

    def finish(self) -> None:
        self.write(self.sp.decode(self.ids)[self.printed:] + "\n")

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.continuation += text


def unescape(text: str) -> str:
    r"""Shell-typed escapes as a user means them: \n, \t and \\."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


@dataclass
class GenerateConfig:
    """`openllama generate`'s settings: what to continue, how far, how to choose each token."""

    # a model checkpoint, or a training run directory (its newest checkpoint)
    checkpoint: str = field(metadata={POSITIONAL: True})
    prompt: str  # the text to continue; \n and \t typed in a shell become newline and tab
    max_new_tokens: int = 64  # tokens to generate at most
    temperature: float = 0.0  # sampling temperature; 0 means greedy
    top_p: float = 1.0  # nucleus sampling: the probability mass drawn from, in (0, 1]
    seed: int = 0  # seed of the sampling keys
    tokenizer: str | None = None  # SentencePiece tokenizer.model (None: the checkpoint's own)
    output: str | None = None  # also write the prompt and continuation to this file, whole once done

    def __post_init__(self) -> None:
        check_sampling(self.max_new_tokens, self.temperature, self.top_p)


def stream_generation(settings: GenerateConfig, out: TextIO | None = None) -> None:
    """Generate text from a checkpoint: print the prompt, then its continuation token by token as it is made.
    The tokenizer is checked against the checkpoint before any weights load."""
    out = out or sys.stdout
    model_config = checkpoint.read_config(settings.checkpoint)
    tokenizer_path = settings.tokenizer or checkpoint.tokenizer_of(settings.checkpoint)
    if tokenizer_path is None:
        raise commands.BadInput(
            f"checkpoint {checkpoint.resolve(settings.checkpoint)} has no {checkpoint.TOKENIZER}; "
            "pass --tokenizer PATH"
        )
    sp = load_for_model(tokenizer_path, model_config.vocab_size, model_config.bos_token_id,
                        model_config.eos_token_id)
    model_config, params, _ = checkpoint.load_model(settings.checkpoint)
    prompt = unescape(settings.prompt)
    prompt_ids = [model_config.bos_token_id] + sp.encode(prompt)
    out.write(prompt)
    stream = TextStream(sp, prompt_ids, out)
    generate(params, model_config, prompt_ids, settings.max_new_tokens, settings.temperature, settings.top_p,
             settings.seed, on_token=stream)
    stream.finish()
    if settings.output:
        files.write_text(settings.output, prompt + stream.continuation)
