"""lm-evaluation-harness model `openllama`: our JAX checkpoints scored the way OpenLLaMA was evaluated.

- Tokens come from the checkpoint's own SentencePiece model, and every context starts with BOS (id 1),
  as OpenLLaMA was trained and evaluated (lm-eval's `hf` backend with `add_bos_token=True` does the same).
- Loglikelihood requests are packed (`eval/packing.py`): the choices of a question share one copy of its
  context, several questions share a row, and the output layer runs only at the scored tokens.
- `loglikelihood_rolling` scores a document in disjoint windows of the model's context (lm-eval's
  rolling-window utilities), the first conditioned on BOS.
- `generate_until` decodes greedily with the one decoder (`eval/decode.py`), one request at a time,
  stopping at EOS, at any `until` string, or after `max_gen_toks`.
- `workers=N` spreads the batches over N Ray actors that each hold the model; a batch is scored the same
  way wherever it runs, so results do not depend on N.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from openllama.commands import BadInput
from openllama.data.tokenizer import load_for_model
from openllama.eval import decode
from openllama.eval.packing import SLOT_BLOCK, Batch, make_batches, packed_attention_mask
from openllama.ray_jobs import connect
from openllama.train import checkpoint
from openllama.train.model import Llama, LlamaConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


class Scorer:
    """The model, its tokenizer and compiled functions in one process: the driver's, or each Ray actor's."""

    def __init__(self, checkpoint_dir: str, tokenizer_path: str, max_length: int):
        self.config, self.params, _ = checkpoint.load_model(checkpoint_dir)
        self.tokenizer = load_for_model(tokenizer_path, self.config.vocab_size, self.config.bos_token_id,
                                        self.config.eos_token_id)
        self.max_length = max_length
        model = Llama(self.config, decode.RUNTIME)

        def hidden_states(params: Any, tokens: jax.Array, positions: jax.Array, questions: jax.Array,
                          branches: jax.Array) -> jax.Array:
            mask = packed_attention_mask(questions, branches)
            hidden, _ = model.apply({"params": params}, tokens, positions, mask=mask, method=Llama.hidden_states)
            return hidden

        def score_slots(params: Any, hidden: jax.Array, index: jax.Array, target: jax.Array) -> tuple:
            logits = model.apply({"params": params}, hidden[index], method=Llama.logits)
            logprob = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
            return logprob, jnp.argmax(logits, axis=-1) == target

        # the output layer is a program of its own, run on SLOT_BLOCK scored tokens at a time: it then
        # runs where it is read, a few tokens per row instead of the whole row, and compiles once (the
        # scored positions are picked inside it: indexing a JAX array from Python costs far more)
        self._hidden_states = jax.jit(hidden_states)
        self._score_slots = jax.jit(score_slots)

    def loglikelihoods(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Per slot of a batch: the target's log-probability and whether it is the greedy choice."""
        *inputs, index, target = batch
        hidden = self._hidden_states(self.params, *inputs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        blocks = [slice(start, start + SLOT_BLOCK) for start in range(0, len(index), SLOT_BLOCK)]
        scored = [self._score_slots(self.params, hidden, index[block], target[block]) for block in blocks]
        logprobs, greedy = zip(*scored, strict=True)
        return np.concatenate(logprobs), np.concatenate(greedy)

    def generate(self, context: list[int], until: list[str], max_gen_toks: int) -> str:
        """Greedy continuation of `context` within the model's context, cut before the first `until` string."""
        context = context[-max(1, self.max_length - max_gen_toks) :]
        max_new_tokens = min(max_gen_toks, self.max_length - len(context))
        if max_new_tokens < 1:
            return ""
        generated: list[int] = []

        def stop_at_until(token: int) -> bool:
            generated.append(token)
            text = self.tokenizer.decode(generated)
            return any(stop in text for stop in until)

        decode.generate(self.params, self.config, context, max_new_tokens, on_token=stop_at_until)
        text = self.tokenizer.decode(generated)
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
        config = checkpoint.read_config(self.checkpoint_dir)
        tokenizer_path = Path(tokenizer) if tokenizer else checkpoint.tokenizer_of(self.checkpoint_dir)
        if tokenizer_path is None:
            raise FileNotFoundError(
                f"checkpoint {self.checkpoint_dir} has no {checkpoint.TOKENIZER}; "
                f"pass --tokenizer PATH/{checkpoint.TOKENIZER}"
            )
        self.config = config
        self.tokenizer = load_for_model(tokenizer_path, config.vocab_size, config.bos_token_id, config.eos_token_id)
        self.tokenizer_path = str(tokenizer_path.absolute())
        self.batch_size = 16 if batch_size in ("auto", None) else int(batch_size)
        self._max_length = int(max_length or config.max_position_embeddings)
        self.workers = int(workers)
        if self.workers < 1:
            raise BadInput(f"workers={self.workers} must be at least 1")
        self._scorers = self._start_scorers()

    def in_process_model(self) -> tuple[LlamaConfig, Any] | None:
        """(config, params) when the model lives in this process (one worker), so other scoring can reuse
        the weights instead of loading a second copy; None when they live in Ray actors."""
        if self.workers > 1:
            return None
        scorer = self._scorers[0]
        return scorer.config, scorer.params

    def _start_scorers(self) -> list[Any]:
        args = (str(self.checkpoint_dir), self.tokenizer_path, self._max_length)
        if self.workers == 1:
            return [Scorer(*args)]
        # RAY_ADDRESS joins a running cluster; else an in-process Ray on 127.0.0.1 (connect sets that up
        # before Ray is first imported)
        connect(log_to_driver=False)
        import ray  # only for workers > 1: importing Ray costs about a second

        cpus = ray.cluster_resources().get("CPU", 1.0)
        per_actor = min(1.0, cpus / (self.workers + 1))  # leave room for the driver and anything else
        actor = ray.remote(num_cpus=per_actor)(Scorer)
        return [actor.remote(*args) for _ in range(self.workers)]

    def _map(self, method: str, items: list[tuple], desc: str) -> list[Any]:
        """`Scorer.method(*item)` for each item, round-robin over the scorers, in the order given."""
        if self.workers == 1:
            call: Callable = getattr(self._scorers[0], method)
            return [call(*item) for item in tqdm(items, desc=desc, disable=not items)]
        import ray  # only for workers > 1, as in _start_scorers

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
