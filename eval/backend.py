"""lm-evaluation-harness model `openllama`: our JAX checkpoints scored the way OpenLLaMA was evaluated.

- Tokens come from the checkpoint's own SentencePiece model, and every context starts with BOS (id 1),
  as OpenLLaMA was trained and evaluated (lm-eval's `hf` backend with `add_bos_token=True` does the same).
- Loglikelihood requests are packed: the choices of a question share one copy of its context (each
  continuation is a branch that sees the context and itself), several questions share a row, and the
  output layer runs only at the scored tokens. Rows are batched at a few bucket widths, so XLA compiles
  a handful of shapes. Inputs longer than the context are cut from the left, keeping the continuation.
- `loglikelihood_rolling` scores a document in disjoint windows of the model's context (lm-eval's
  rolling-window utilities), the first conditioned on BOS.
- `generate_until` decodes greedily with the KV cache, one request at a time, stopping at EOS, at any
  `until` string, or after `max_gen_toks`.
- `workers=N` spreads the batches over N Ray actors that each hold the model; a batch is scored the same
  way wherever it runs, so results do not depend on N.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from openllama.train import checkpoint
from openllama.train.model import Llama, LlamaConfig, config_from_dict, init_cache

log = logging.getLogger(__name__)

SMALLEST_BUCKET = 32
SLOT_BLOCK = 256  # scored tokens per batch are padded to a multiple of this
DEFAULT_MAX_GEN_TOKS = 256

# (context tokens, continuation tokens) with the context already starting with BOS
TokenPair = tuple[list[int], list[int]]
# tokens, positions, question numbers, branch numbers (int32 [rows, width]); then per scored token its
# flat index rows*width into the outputs and its target (int32 [slots])
Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def bucket_length(n: int, max_length: int) -> int:
    """The padded length for an input of n tokens: 32, 48, 64, 96, 128, 192, ... (at most max_length).

    Steps of 1.5x and 1.33x keep padding under a third while the number of compiled shapes stays small.
    """
    length = SMALLEST_BUCKET
    while length < n:
        length += length // 2 if length & (length - 1) == 0 else length // 3
    return min(length, max_length)


def load_tokenizer(path: str | Path, config: LlamaConfig) -> spm.SentencePieceProcessor:
    """The SentencePiece model at `path`, checked against the checkpoint it will feed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist; pass --tokenizer PATH/tokenizer.model")
    tokenizer = spm.SentencePieceProcessor(model_file=str(path))
    if tokenizer.get_piece_size() > config.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {tokenizer.get_piece_size()} pieces but the checkpoint's "
            f"model.vocab_size is {config.vocab_size}: it is not the tokenizer this model was trained with "
            "(pass the right one with --tokenizer)"
        )
    if (tokenizer.bos_id(), tokenizer.eos_id()) != (config.bos_token_id, config.eos_token_id):
        raise ValueError(
            f"tokenizer {path} has bos/eos ids {tokenizer.bos_id()}/{tokenizer.eos_id()} but the checkpoint "
            f"expects {config.bos_token_id}/{config.eos_token_id} (pass the right one with --tokenizer)"
        )
    return tokenizer


@dataclass
class PackedRow:
    """One row of model input holding several requests, each context once.

    A question's context comes first; each of its continuations follows as a branch (all its tokens
    but the last) whose tokens see the context and their own branch only, at the positions they would
    have after the context alone. So k choices cost one context plus k continuations instead of k
    times both, and several questions share a row instead of padding one each. A slot is one scored
    token: (index in the row of the token whose output predicts it, the token, the request).
    """

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    questions: list[int] = field(default_factory=list)  # 1, 2, ... per question in the row; 0 is padding
    branches: list[int] = field(default_factory=list)  # 0 for a context, i for its i-th continuation
    slots: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, context: Sequence[int], continuations: list[tuple[int, list[int]]]) -> None:
        """Append one question: its context, then a branch per (request, continuation)."""
        question = (self.questions[-1] if self.questions else 0) + 1
        start, n = len(self.tokens), len(context)
        self._extend(context, range(n), question, 0)
        for branch, (request, continuation) in enumerate(continuations, 1):
            self.slots.append((start + n - 1, continuation[0], request))
            for offset, target in enumerate(continuation[1:]):
                self.slots.append((len(self.tokens) + offset, target, request))
            self._extend(continuation[:-1], range(n, n + len(continuation) - 1), question, branch)

    def _extend(self, tokens: Sequence[int], positions: range, question: int, branch: int) -> None:
        self.tokens += tokens
        self.positions += positions
        self.questions += [question] * len(tokens)
        self.branches += [branch] * len(tokens)


def pack_rows(pairs: Sequence[TokenPair], max_length: int) -> list[PackedRow]:
    """Rows of at most max_length tokens scoring every pair, fullest first.

    Each pair is context+continuation cut from the left to max_length+1 tokens, as lm-eval's `hf`
    backend does. Pairs with the same (cut) context form one question; a question too long for one row
    is split over rows, each with its own copy of the context. Questions go into rows best-fit, longest
    first, into rows as wide as the smallest power of two that holds the longest question. An empty
    continuation has nothing to score (its log-likelihood is 0) and gets no slot.
    """
    questions: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for request, (context, continuation) in enumerate(pairs):
        if not continuation:
            continue
        whole = (context + continuation)[-(max_length + 1) :]
        n_scored = min(len(continuation), len(whole) - 1)
        questions.setdefault(tuple(whole[:-n_scored]), []).append((request, whole[-n_scored:]))
    units: list[tuple[int, tuple[int, ...], list[tuple[int, list[int]]]]] = []  # (tokens, context, branches)
    for context, branches in questions.items():
        unit: list[tuple[int, list[int]]] = []
        size = len(context)
        for request, continuation in branches:
            if unit and size + len(continuation) - 1 > max_length:
                units.append((size, context, unit))
                unit, size = [], len(context)
            unit.append((request, continuation))
            size += len(continuation) - 1
        units.append((size, context, unit))
    units.sort(key=lambda unit: (-unit[0], unit[2][0][0]))
    width = 1 << max(units[0][0] - 1, 0).bit_length() if units else 1
    width = min(max(width, SMALLEST_BUCKET), max_length)
    rows: list[PackedRow] = []
    free: list[tuple[int, int]] = []  # (free tokens, row number), sorted: best fit is the first that fits
    for size, context, branches in units:
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            rows.append(PackedRow())
            number, room = len(rows) - 1, width
        else:
            room, number = free.pop(at)
        rows[number].add(context, branches)
        bisect.insort(free, (room - size, number))
    return sorted(rows, key=lambda row: -len(row.tokens))


def batch_rows(rows: Sequence[PackedRow], n_rows: int, width: int) -> tuple[Batch, np.ndarray]:
    """Model inputs for these rows, padded to [n_rows, width], and the request each slot belongs to (-1:
    padding). Slots are padded to a multiple of SLOT_BLOCK."""
    n_slots = -(-sum(len(row.slots) for row in rows) // SLOT_BLOCK) * SLOT_BLOCK
    arrays = np.zeros((4, n_rows, width), np.int32)  # tokens, positions, questions, branches
    slot_index = np.zeros(n_slots, np.int32)
    slot_target = np.zeros(n_slots, np.int32)
    slot_request = np.full(n_slots, -1, np.int64)
    at = 0
    for r, row in enumerate(rows):
        n = len(row.tokens)
        for a, values in enumerate((row.tokens, row.positions, row.questions, row.branches)):
            arrays[a, r, :n] = values
        for index, target, request in row.slots:
            slot_index[at], slot_target[at], slot_request[at] = r * width + index, target, request
            at += 1
    return (*arrays, slot_index, slot_target), slot_request


def make_batches(pairs: Sequence[TokenPair], batch_size: int, max_length: int) -> list[tuple[Batch, np.ndarray]]:
    """All pairs packed into batches of one shape, [min(batch_size, rows rounded up to a power of two),
    bucket of the longest row], so that a whole evaluation compiles the model once: on CPU, compiling
    another shape costs about what scoring a few hundred tokens does, and full rows leave little to pad."""
    rows = pack_rows(pairs, max_length)
    if not rows:
        return []
    width = bucket_length(max(len(row.tokens) for row in rows), max_length)
    n_rows = min(batch_size, 1 << (len(rows) - 1).bit_length())
    return [batch_rows(rows[start : start + n_rows], n_rows, width) for start in range(0, len(rows), n_rows)]


def packed_attention_mask(questions: jax.Array, branches: jax.Array) -> jax.Array:
    """[rows, 1, width, width]: a token sees earlier tokens of its own question that are its context
    or in its own branch (padding, question 0, sees only padding)."""
    width = questions.shape[1]
    causal = jnp.tril(jnp.ones((width, width), bool))
    same_question = questions[:, :, None] == questions[:, None, :]
    visible_branch = (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])
    return (causal & same_question & visible_branch)[:, None]


class Scorer:
    """The model, its tokenizer and compiled functions in one process: the driver's, or each Ray actor's."""

    def __init__(self, checkpoint_dir: str, tokenizer_path: str, max_length: int):
        self.config, self.params, _ = checkpoint.load_model(checkpoint_dir)
        self.tokenizer = spm.SentencePieceProcessor(model_file=tokenizer_path)
        self.max_length = max_length
        model = Llama(self.config)

        def hidden_states(params: Any, tokens: jax.Array, positions: jax.Array, questions: jax.Array,
                          branches: jax.Array) -> jax.Array:
            mask = packed_attention_mask(questions, branches)
            hidden, _ = model.apply({"params": params}, tokens, positions, mask=mask, method=Llama.hidden_states)
            return hidden

        def score_slots(params: Any, hidden: jax.Array, target: jax.Array) -> tuple:
            logits = model.apply({"params": params}, hidden, method=Llama.logits)
            logprob = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
            return logprob, jnp.argmax(logits, axis=-1) == target

        def extend(params: Any, tokens: jax.Array, cache: list[dict]) -> tuple:
            return model.apply({"params": params}, tokens, cache=cache)

        # the output layer is a program of its own, run on SLOT_BLOCK scored tokens at a time: it then
        # runs where it is read, a few tokens per row instead of the whole row, and compiles once
        self._hidden_states = jax.jit(hidden_states)
        self._score_slots = jax.jit(score_slots)
        self._extend = jax.jit(extend)

    def loglikelihoods(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Per slot of a batch: the target's log-probability and whether it is the greedy choice."""
        *inputs, index, target = batch
        hidden = self._hidden_states(self.params, *inputs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        blocks = [slice(start, start + SLOT_BLOCK) for start in range(0, len(index), SLOT_BLOCK)]
        scored = [self._score_slots(self.params, hidden[index[block]], target[block]) for block in blocks]
        logprobs, greedy = zip(*scored, strict=True)
        return np.concatenate(logprobs), np.concatenate(greedy)

    def generate(self, context: list[int], until: list[str], max_gen_toks: int) -> str:
        """Greedy continuation of `context`, cut before the first `until` string."""
        context = context[-max(1, self.max_length - max_gen_toks) :]
        n = len(context)
        prompt = np.zeros((1, bucket_length(n, self.max_length)), np.int32)
        prompt[0, :n] = context
        cache = init_cache(self.config, 1, bucket_length(min(n + max_gen_toks, self.max_length), self.max_length))
        # The prompt is right-padded to its bucket; rewinding the cache index to n makes the next token
        # overwrite the padding, and the causal mask never lets a query see keys beyond its own position.
        logits, cache = self._extend(self.params, jnp.asarray(prompt), cache)
        cache = [dict(layer, index=jnp.asarray(n, jnp.int32)) for layer in cache]
        next_token = int(jnp.argmax(logits[0, n - 1]))
        generated: list[int] = []
        text = ""
        while next_token != self.config.eos_token_id and len(generated) < max_gen_toks:
            generated.append(next_token)
            text = self.tokenizer.decode(generated)
            if any(stop in text for stop in until) or n + len(generated) >= cache[0]["k"].shape[1]:
                break
            logits, cache = self._extend(self.params, jnp.asarray([[next_token]], jnp.int32), cache)
            next_token = int(jnp.argmax(logits[0, -1]))
        for stop in until:
            text = text.split(stop)[0]
        return text


@register_model("openllama")
class OpenLlamaLM(TemplateLM):
    """`lm_eval --model openllama --model_args pretrained=CKPT[,tokenizer=PATH,workers=N]` (or the object)."""

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        batch_size: int | str = 16,
        workers: int = 1,
        max_length: int | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
    ):
        super().__init__()
        del max_batch_size, device  # lm-eval passes these to every model; JAX places arrays itself
        self.checkpoint_dir = checkpoint.resolve(pretrained)
        config = config_from_dict(json.loads((self.checkpoint_dir / checkpoint.MODEL_JSON).read_text()))
        tokenizer_path = Path(tokenizer) if tokenizer else self.checkpoint_dir / checkpoint.TOKENIZER
        if not tokenizer and not tokenizer_path.is_file():
            raise FileNotFoundError(
                f"checkpoint {self.checkpoint_dir} has no tokenizer.model; pass --tokenizer PATH/tokenizer.model"
            )
        self.config = config
        self.tokenizer = load_tokenizer(tokenizer_path, config)
        self.tokenizer_path = str(Path(tokenizer_path).absolute())
        self.batch_size = 16 if batch_size in ("auto", None) else int(batch_size)
        self._max_length = int(max_length or config.max_position_embeddings)
        self.workers = int(workers)
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be at least 1")
        self._scorers = self._start_scorers()

    def _start_scorers(self) -> list[Any]:
        args = (str(self.checkpoint_dir), self.tokenizer_path, self._max_length)
        if self.workers == 1:
            return [Scorer(*args)]
        import ray

        from openllama.ray_jobs import connect

        connect(log_to_driver=False)  # RAY_ADDRESS joins a running cluster; else an in-process Ray on 127.0.0.1
        cpus = ray.cluster_resources().get("CPU", 1.0)
        per_actor = min(1.0, cpus / (self.workers + 1))  # leave room for the driver and anything else
        actor = ray.remote(num_cpus=per_actor)(Scorer)
        return [actor.remote(*args) for _ in range(self.workers)]

    def _map(self, method: str, items: list[tuple], desc: str) -> list[Any]:
        """`Scorer.method(*item)` for each item, round-robin over the scorers, in the order given."""
        if self.workers == 1:
            call: Callable = getattr(self._scorers[0], method)
            return [call(*item) for item in tqdm(items, desc=desc, disable=not items)]
        import ray

        futures = [getattr(self._scorers[i % self.workers], method).remote(*item) for i, item in enumerate(items)]
        return [ray.get(future) for future in tqdm(futures, desc=desc, disable=not items)]

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id()

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id()

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_path

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of `string`, BOS first unless add_special_tokens is False."""
        ids = self.tokenizer.encode(string)
        return ids if add_special_tokens is False else [self.tokenizer.bos_id(), *ids]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        batches = make_batches([(ctx, cont) for _, ctx, cont in requests], self.batch_size, self.max_length)
        scored = self._map("loglikelihoods", [(batch,) for batch, _ in batches], "loglikelihood batches")
        logprobs = np.zeros(len(requests))
        misses = np.zeros(len(requests), np.int64)  # continuation tokens that are not the greedy choice
        for (slot_logprob, slot_greedy), (_, slot_request) in zip(scored, batches, strict=True):
            real = slot_request >= 0
            np.add.at(logprobs, slot_request[real], slot_logprob[real])
            np.add.at(misses, slot_request[real], ~slot_greedy[real])
        results = [(float(logprob), not miss) for logprob, miss in zip(logprobs, misses, strict=True)]
        for (cache_key, _, _), result in zip(requests, results, strict=True):
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, (string,) in enumerate(request.args for request in requests):
            token_windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.id_to_piece(self.eot_token_id)
        items = []
        for context, gen_kwargs in (request.args for request in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
            if kwargs.get("do_sample"):
                log.warning("openllama decodes greedily; ignoring do_sample/temperature in %s", gen_kwargs)
            until = [stop for stop in handle_stop_sequences(kwargs.get("until"), eos=eos) if stop]
            items.append((self.tok_encode(context), until, int(kwargs["max_gen_toks"])))
        outputs = self._map("generate", items, "generate_until")
        for request, output in zip(requests, outputs, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, output)
        return outputs
