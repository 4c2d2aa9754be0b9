"""`openllama eval`: request checks before any work, OpenLLaMA's table, outputs and MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from openllama.cli import main as cli
from openllama.data.shards import write_dataset
from openllama.eval import published
from openllama.eval.run import (
    EvalInputError,
    Row,
    check_checkpoint,
    check_task_names,
    check_tasks_have_documents,
    held_out_perplexity,
    open_validation,
    render_table,
    table_rows,
    task_manager,
)
from openllama.train.checkpoint import load_model, save_model
from openllama.train.model import Llama, LlamaConfig, init_params


@pytest.fixture(scope="module")
def training_run(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    """A training run's layout: RUN/mlflow_run_id and RUN/checkpoints/step_00000007/ with state.json."""
    run = tmp_path_factory.mktemp("run")
    config = LlamaConfig.preset("tiny")
    ckpt = save_model(run / "checkpoints" / "step_00000007", init_params(config, seed=1), config, sp_model)
    (ckpt / "state.json").write_text(json.dumps({"step": 7}))
    (run / "mlflow_run_id").write_text("abc123\n")
    return run


def test_unknown_task_names_are_refused_with_the_closest_names():
    manager = task_manager(["local_arc"], [])
    with pytest.raises(EvalInputError, match="'local_ark' .*did you mean local_arc"):
        check_task_names(["local_arc", "local_ark"], manager)


def test_a_task_without_documents_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty_task.yaml").write_text(
        "task: empty_task\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'empty.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: 0\n"
        "doc_to_choice: ['a', 'b']\n"
    )
    manager = task_manager(["empty_task"], [str(tmp_path)])
    with pytest.raises(EvalInputError, match="empty_task"):
        check_tasks_have_documents(["empty_task"], manager)


def test_a_path_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(EvalInputError, match="is not a checkpoint"):
        check_checkpoint(str(tmp_path), None)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, sp_model):
    config = LlamaConfig.preset("tiny", vocab_size=256)
    ckpt = save_model(tmp_path / "small_vocab", init_params(config), config, None)
    with pytest.raises(EvalInputError, match="512 pieces but the model's vocab_size is 256"):
        check_checkpoint(str(ckpt), str(sp_model))


def test_cb_and_wsc_rows_stay_out_of_the_average():
    results = {
        "results": {"cb": {"acc,none": 0.9, "f1,none": 0.8}, "rte": {"acc,none": 0.5, "acc_stderr,none": 0.1}},
        "higher_is_better": {"cb": {"acc": True, "f1": True}, "rte": {"acc": True}},
    }
    assert [(r.task, r.metric, r.averaged) for r in table_rows(results)] == [
        ("cb", "acc", False), ("cb", "f1", False), ("rte", "acc", True),
    ]


def test_the_average_rule_reproduces_the_published_averages():
    rows = [Row(task, metric, value, True) for (task, metric), value in published.published("GPT-J 6B").items()]
    table = render_table(rows, "ours", compare=True)
    average = table.strip().splitlines()[-1].split("|")[2:-1]
    expected = [published.PUBLISHED_AVERAGE[m] for m in ("GPT-J 6B", *published.COMPARE_MODELS)]
    assert [float(cell) for cell in average] == pytest.approx(expected, abs=0.005)


def test_eval_writes_the_table_results_and_an_mlflow_run_tagged_with_its_training_run(
    training_run, tmp_path, monkeypatch, mlflow_server
):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    out = tmp_path / "out"
    code = cli(["eval", str(training_run), "--tasks", "local_arc,local_text_perplexity", "--limit", "4",
                "--batch-size", "4", "--output", str(out)])
    assert code == 0
    table = (out / "table.md").read_text()
    assert "| local_arc/acc_norm |" in table and "| Average |" in table
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"local_arc", "local_text_perplexity"}
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("eval").experiment_id
    checkpoint = training_run / "checkpoints" / "step_00000007"
    (run,) = client.search_runs([experiment], filter_string=f"tags.checkpoint = '{checkpoint}'")
    assert run.data.tags["training_run_id"] == "abc123" and run.data.tags["checkpoint_step"] == "7"
    assert run.data.metrics["local_arc/acc"] == results["results"]["local_arc"]["acc,none"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"results.json", "table.md"}


def write_packed_validation(root: Path, rows: np.ndarray, subset: str = "wiki") -> Path:
    """A finished packed dataset holding `rows` as its validation split (written by the format's owner)."""
    write_dataset(str(root), {("validation", subset): rows}, seq_len=rows.shape[1] - 1, vocab_size=512)
    return root


def test_held_out_perplexity_is_the_mean_loss_over_every_packed_target(training_run, tmp_path):
    rows = np.random.default_rng(0).integers(3, 512, size=(5, 17)).astype(np.int32)
    dataset = open_validation(str(write_packed_validation(tmp_path / "data", rows)), max_length=256)
    config, params, _ = load_model(training_run)
    (loss, perplexity) = held_out_perplexity(config, params, dataset, batch_size=2)
    logits, _ = Llama(config).apply({"params": params}, rows[:, :-1])
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    expected = -float(np.take_along_axis(np.asarray(logprobs), rows[:, 1:, None], axis=-1).mean())
    assert (loss.task, loss.metric) == ("validation/wiki", "loss")
    assert loss.value == pytest.approx(expected, abs=1e-5)
    assert perplexity.value == pytest.approx(np.exp(expected), rel=1e-5)


def test_packed_rows_longer_than_the_context_are_refused(tmp_path):
    rows = np.ones((2, 33), np.int32)
    with pytest.raises(EvalInputError, match="rows of 32 tokens do not fit the model's 16-token context"):
        open_validation(str(write_packed_validation(tmp_path / "data", rows)), max_length=16)


def test_without_lm_eval_installed_eval_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    assert cli(["eval", str(tmp_path), "--tasks", "local_arc", "--no-mlflow"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "openllama eval: lm-eval is not installed: pip install 'openllama-ray[eval]'"
    ]


def test_an_eval_without_mlflow_imports_neither_mlflow_nor_torch_and_reports_jaxs_environment(training_run, tmp_path):
    """What a plain `openllama eval --no-mlflow` loads: not MLflow (it logs nothing), not torch (lm-eval would
    import it to seed it and for its environment report, seconds of a short evaluation); the results still
    carry lm-eval's environment keys, describing JAX."""
    out = tmp_path / "out"
    probe = ("import sys; from openllama.cli import main; "
             f"code = main(['eval', {str(training_run)!r}, '--tasks', 'local_arc', '--limit', '4', '--batch-size', "
             f"'4', '--no-mlflow', '--output', {str(out)!r}]); "
             "print(code, sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["pretty_env_info"].startswith(f"JAX {jax.__version__}")
    assert results["lm_eval_version"] != "N/A" and "upper_git_hash" in results
