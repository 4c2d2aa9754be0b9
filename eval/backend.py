"""lm-evaluation-harness model `openllama`: our JAX checkpoints scored the way OpenLLaMA was evaluated.

- Tokens come from the checkpoint's own SentencePiece model, and every context starts with BOS (id 1),
  as OpenLLaMA was trained and evaluated (lm-eval's `hf` backend with `add_bos_token=True` does the same).
- Requests are sorted by length and scored in fixed-size batches padded to a few bucket lengths
  (32, 64, 128, ... up to the model's context), so XLA compiles a handful of shapes instead of one per
  request. Inputs longer than the context are cut from the left, keeping the continuation.
- `loglikelihood_rolling` scores a document in disjoint windows of the model's context (lm-eval's
  rolling-window utilities), the first conditioned on BOS.
- `generate_until` decodes greedily with the KV cache, one request at a time, stopping at EOS, at any
  `until` string, or after `max_gen_toks`.
- `workers=N` spreads the batches over N Ray actors that each hold the model; a batch is scored the same
  way wherever it runs, so results do not depend on N.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
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
DEFAULT_MAX_GEN_TOKS = 256

# (context tokens, continuation tokens) with the context already starting with BOS
TokenPair = tuple[list[int], list[int]]
# tokens and targets (int32), continuation mask without its last token (float32), all [batch_size, width],
# and the position of each row's last continuation token (int32 [batch_size])
Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# per row of a batch: (request index, the request's last continuation token) for every request it answers
RowOwners = list[list[tuple[int, int]]]


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


def make_batches(pairs: Sequence[TokenPair], batch_size: int, max_length: int) -> tuple[list[Batch], list[RowOwners]]:
    """Longest-first batches scoring every pair, and which requests each row answers.

    Each row is context+continuation cut from the left to max_length+1 tokens, shifted into inputs and
    targets. Requests whose inputs are identical and differ only in their last continuation token (the
    choices of a yes/no or one-word question) share one row: the model sees those tokens once and each
    request reads its own last token from that row's final distribution. Short batches are filled with
    empty rows so that every batch has the same number of rows.
    """
    rows: dict[tuple, list[tuple[int, int]]] = {}
    for index, (context, continuation) in enumerate(pairs):
        whole = (context + continuation)[-(max_length + 1) :]
        rows.setdefault((tuple(whole[:-1]), len(continuation)), []).append((index, whole[-1]))
    keys = sorted(rows, key=lambda key: (-len(key[0]), rows[key][0][0]))
    batches, owners = [], []
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        width = bucket_length(len(chunk[0][0]), max_length)
        tokens = np.zeros((batch_size, width), np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        last = np.zeros(batch_size, np.int32)
        for row, (inputs, n_continuation) in enumerate(chunk):
            n = len(inputs)
            tokens[row, :n] = inputs
            targets[row, : n - 1] = inputs[1:]
            mask[row, n - n_continuation : n - 1] = 1.0
            last[row] = n - 1
        batches.append((tokens, targets, mask, last))
        owners.append([rows[key] for key in chunk])
    return batches, owners


class Scorer:
    """The model, its tokenizer and compiled functions in one process: the driver's, or each Ray actor's."""

    def __init__(self, checkpoint_dir: str, tokenizer_path: str, max_length: int):
        self.config, self.params, _ = checkpoint.load_model(checkpoint_dir)
        self.tokenizer = spm.SentencePieceProcessor(model_file=tokenizer_path)
        self.max_length = max_length
        model = Llama(self.config)

        def score(params: Any, tokens: jax.Array, targets: jax.Array, mask: jax.Array, last: jax.Array) -> tuple:
            logits, _ = model.apply({"params": params}, tokens)
            # log-probabilities only where they are read: target logit minus the log-normalizer, so no
            # second [batch, width, vocab] array is materialized
            normalizer = jax.nn.logsumexp(logits, axis=-1)
            target_logprobs = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - normalizer
            greedy = (jnp.argmax(logits, axis=-1) == targets) | (mask == 0)
            rows = jnp.arange(logits.shape[0])
            last_logprobs = logits[rows, last] - normalizer[rows, last][:, None]
            return (target_logprobs * mask).sum(-1), greedy.all(-1), last_logprobs

        def extend(params: Any, tokens: jax.Array, cache: list[dict]) -> tuple:
            return model.apply({"params": params}, tokens, cache=cache)

        self._score = jax.jit(score)
        self._extend = jax.jit(extend)

    def loglikelihoods(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: log-probability of the continuation but its last token, whether those tokens are all
        the greedy choice, and the log-probabilities [vocab] at the last token's position."""
        return tuple(np.asarray(x) for x in self._score(self.params, *batch))

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
        batches, owners = make_batches([(ctx, cont) for _, ctx, cont in requests], self.batch_size, self.max_length)
        scored = self._map("loglikelihoods", [(batch,) for batch in batches], "loglikelihood batches")
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for (head_logprobs, head_greedy, last_logprobs), batch_owners in zip(scored, owners, strict=True):
            for row, row_owners in enumerate(batch_owners):
                best = int(np.argmax(last_logprobs[row]))
                for index, last_token in row_owners:
                    logprob = float(head_logprobs[row]) + float(last_logprobs[row, last_token])
                    results[index] = (logprob, bool(head_greedy[row]) and best == last_token)
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
