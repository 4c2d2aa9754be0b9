"""Our backend against lm-eval's own `hf` backend (transformers, torch CPU) on the same exported weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from openllama.eval.backend import OpenLlamaLM
from openllama.eval.run import TASK_PACK
from openllama.train.checkpoint import save_model
from openllama.train.convert.hf import export_hf
from openllama.train.model import LlamaConfig, init_params

MULTIPLE_CHOICE = ["local_arc", "local_hellaswag", "local_piqa", "local_boolq"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> tuple[Path, Path]:
    """(our checkpoint, its `export-hf` directory) of a tiny model with random weights."""
    config = LlamaConfig.preset("tiny", initializer_range=0.1)
    root = tmp_path_factory.mktemp("parity")
    ckpt = save_model(root / "ckpt", init_params(config, seed=5), config, sp_model)
    return ckpt, export_hf(ckpt, root / "hf")


def evaluate(lm, tasks: list[str]) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASK_PACK), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0)


def hf_model(hf_dir: Path, add_bos_token: bool):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), add_bos_token=add_bos_token, batch_size=8, device="cpu", dtype="float32")


def per_item(results: dict, task: str) -> list[float]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [float(r[0]) if isinstance(r, tuple | list) else float(r) for s in samples for r in s["filtered_resps"]]


@pytest.fixture(scope="module")
def multiple_choice_runs(weights, monkeypatch_module) -> tuple[dict, dict]:
    ckpt, hf_dir = weights
    return evaluate(OpenLlamaLM(str(ckpt), batch_size=8), MULTIPLE_CHOICE), evaluate(
        hf_model(hf_dir, add_bos_token=True), MULTIPLE_CHOICE
    )


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield patch


@pytest.mark.parametrize("task", MULTIPLE_CHOICE)
def test_per_choice_loglikelihoods_match_the_hf_backend(multiple_choice_runs, task):
    ours, theirs = multiple_choice_runs
    assert per_item(ours, task) == pytest.approx(per_item(theirs, task), abs=1e-4)


@pytest.mark.parametrize("task", MULTIPLE_CHOICE)
def test_accuracies_match_the_hf_backend(multiple_choice_runs, task):
    ours, theirs = multiple_choice_runs
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][task].get(metric) == theirs["results"][task].get(metric)


def test_rolling_loglikelihoods_match_the_hf_backend_conditioned_on_bos(weights, monkeypatch_module):
    # hf's rolling path encodes the document itself with add_bos_token and then prefixes BOS again;
    # without add_bos_token it conditions the document on one BOS, which is what we score.
    ckpt, hf_dir = weights
    ours = evaluate(OpenLlamaLM(str(ckpt), batch_size=8), ["local_text_perplexity"])
    theirs = evaluate(hf_model(hf_dir, add_bos_token=False), ["local_text_perplexity"])
    task = "local_text_perplexity"  # whole documents: float32 sums of ~150 token terms, so relative 1e-6
    assert per_item(ours, task) == pytest.approx(per_item(theirs, task), rel=1e-6, abs=1e-4)
