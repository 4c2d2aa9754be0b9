"""Text generation with the KV cache: one jitted prefill over the prompt, then one jitted step per token.

Batches: prompts of equal length run together (no padding, so no attention mask is needed); prompts of
different lengths run as separate groups. Without streaming, all decode steps run on device in one
`while_loop`; streaming (`on_token`, one prompt) brings each token to the host as it is made.
Greedy by default; with temperature > 0, nucleus sampling from explicit PRNG keys, so a seed
reproduces the same text.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from openllama.train.model import Llama, LlamaConfig, init_cache

CACHE_ROUNDING = 128  # cache lengths are rounded up so the decode step compiles once for many lengths


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
    logits, cache = Llama(config).apply({"params": params}, ids, cache=cache)
    return sample_next(logits[:, -1], key, temperature, top_p), cache


_step = jax.jit(_forward_and_sample, static_argnums=0)  # prefill ([batch, prompt]) and streamed steps ([batch, 1])


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
                    on_token: Callable[[int], None] | None) -> list[list[int]]:
    batch, prompt_len = prompts.shape
    total = prompt_len + max_new_tokens
    cache = init_cache(config, batch, -(-total // CACHE_ROUNDING) * CACHE_ROUNDING)
    temperature, top_p = jnp.float32(temperature), jnp.float32(top_p)
    token, cache = _step(config, params, jnp.asarray(prompts), cache, jax.random.fold_in(key, 0), temperature, top_p)
    if on_token is None:
        tokens, steps = _decode_on_device(config, params, token, cache, key, temperature, top_p,
                                          max_new_tokens, stop_ids)
        return [_until_stop(row, stop_ids) for row in np.asarray(tokens)[:, : int(steps)].tolist()]
    # streaming: one host round trip per token, so each can be shown as it comes
    outputs: list[int] = []
    for step in range(1, max_new_tokens + 1):
        token_id = int(token[0])
        if token_id in stop_ids:
            break
        outputs.append(token_id)
        on_token(token_id)
        if step == max_new_tokens:
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
    on_token: Callable[[int], None] | None = None,
) -> list[list[int]] | list[int]:
    """New token ids for each prompt (a single prompt gives a single list), stop token excluded.

    Prompts must already start with BOS if the model expects it. `stop_ids` defaults to EOS; pass
    `()` to always produce `max_new_tokens`. `on_token` sees each new token as it comes (single prompt).
    """
    single = bool(prompt_ids) and isinstance(prompt_ids[0], int)
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS)")
    if any(not 0 <= t < config.vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, vocab_size={config.vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
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


class TextStream:
    """Prints a continuation as tokens arrive, holding back bytes of a character not yet complete.

    Decoding prompt + continuation together keeps SentencePiece's spacing right at the boundary.
    """

    def __init__(self, sp, prompt_ids: list[int], out=None) -> None:
        self.sp, self.ids, self.out = sp, list(prompt_ids), out or sys.stdout
        self.printed = len(sp.decode(self.ids))

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.sp.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence of byte-fallback pieces
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> None:
        text = self.sp.decode(self.ids)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def unescape(text: str) -> str:
    r"""Shell-typed escapes as a user means them: \n, \t and \\."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openllama generate", description="Generate text from a checkpoint.")
    parser.add_argument("ckpt", help="model checkpoint, or a training run directory (newest checkpoint)")
    parser.add_argument("--prompt", required=True, help=r"prompt text; \n and \t are turned into newline and tab")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the checkpoint's)")
    args = parser.parse_args(argv)

    import sentencepiece as spm

    from openllama.train.checkpoint import load_model

    config, params, ckpt_tokenizer = load_model(args.ckpt)
    tokenizer = args.tokenizer or ckpt_tokenizer
    if tokenizer is None or not Path(tokenizer).is_file():
        print(f"openllama generate: {args.ckpt} has no tokenizer.model; pass --tokenizer PATH", file=sys.stderr)
        return 2
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    if sp.vocab_size() != config.vocab_size:
        print(f"openllama generate: tokenizer {tokenizer} has {sp.vocab_size()} pieces but the model's "
              f"vocab_size is {config.vocab_size}", file=sys.stderr)
        return 2
    prompt = unescape(args.prompt)
    prompt_ids = [config.bos_token_id] + sp.encode(prompt)
    sys.stdout.write(prompt)
    stream = TextStream(sp, prompt_ids)
    try:
        generate(params, config, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                 on_token=stream)
    except ValueError as error:
        print(f"\nopenllama generate: {error}", file=sys.stderr)
        return 2
    stream.finish()
    return 0
