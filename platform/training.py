"""`openllama train CONFIG [key=value ...]`: the training stage, with what it asks of the stages beside it.

Training is `train/launch.py`'s `fit`. What around it belongs to other stages is done here, at the roof: on
first use, a config with `data.build_from` (tiny-cpu) gets its dataset built (a tokenizer trained on the corpus,
the corpus tokenized: the data stage's commands, as functions); with `eval.tasks`, eval's `score_checkpoint`
scores checkpoints while training goes on (handed to `fit`, which runs it in Ray tasks); after a run that
finished, with `tracking.register_model`, the final checkpoint is exported and registered in MLflow's model
registry, as `openllama export-hf RUN OUT --register NAME` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

from openllama import commands, files, ray_jobs, tracking
from openllama.config import to_dict
from openllama.data import pack, tokenizer
from openllama.data.shards import DatasetNotFinished, PackedDataset
from openllama.eval.run import check_tasks, score_checkpoint
from openllama.train import registry
from openllama.train.checkpoint import RunDir
from openllama.train.config import TrainConfig, load_config
from openllama.train.convert.hf import write_hf
from openllama.train.goodput import describe
from openllama.train.launch import Stopped, fit, run_goodput
from openllama.train.trainer import check_start, open_datasets, tokenizer_path

log = logging.getLogger("openllama.train")


def ensure_dataset(config: TrainConfig) -> None:
    """Build the packed dataset named by data.path from data.build_from when it is missing (tiny runs).

    Both steps reuse finished work, so an interrupted build is completed by running the command again.
    """
    try:
        PackedDataset.open(config.data.path)
        return
    except (FileNotFoundError, DatasetNotFinished):
        if not config.data.build_from:
            raise
    out = config.data.path.rstrip("/")
    log.info("building %s from %s (data.build_from)", out, config.data.build_from)
    model = config.data.tokenizer
    if model is None or not files.is_file(model):
        model = tokenizer.train_tokenizer([config.data.build_from], f"{out}-tokenizer",
                                          vocab_size=config.llama().vocab_size)
    pack.tokenize_dataset([config.data.build_from], model, out, seq_len=config.train.seq_len)


def register_final_model(config: TrainConfig, run_id: str, checkpoint: Path | str) -> registry.ModelVersion | None:
    """`checkpoint` as the next version of model `config.name` in MLflow's registry, linked to run `run_id`.

    Exported to a temporary folder in the run directory (in staging for a bucket run) and registered from
    there. A failure is one logged line, never an error: the checkpoint is the training's result, and
    `export-hf --register` registers it later.
    """
    scratch = config.staging_dir if files.is_uri(config.run_dir) else config.run_dir
    try:
        Path(scratch).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".register-", dir=scratch) as folder:
            write_hf(checkpoint, Path(folder))
            version = registry.register_export(folder, config.name, run_id, checkpoint)
    except Exception as error:
        log.error("the final model of %s is not registered (%s); register it with `openllama export-hf %s OUT "
                  "--register`", config.name, registry.one_line(error), config.run_dir)
        return None
    log.info("registered %s (MLflow run %s)", version.uri, run_id)
    return version


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="openllama train",
        description="Pretrain LLaMA under Ray Train's JaxTrainer. Rerunning the same command resumes the run.",
        epilog=commands.EXIT_CODES,
    )
    parser.add_argument("config", help="a YAML file or a preset name: tiny-cpu, openllama-3b, openllama-7b, ...")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. train.steps=100 scaling.num_workers=2")
    parser.add_argument("--address", help="Ray cluster (GCS) address, e.g. 127.0.0.1:6379 (default: RAY_ADDRESS, "
                                          "else an in-process Ray)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    commands.quiet_libraries()

    def work() -> int:
        config = load_config(args.config, args.overrides)
        if config.tracking.uri:
            os.environ["MLFLOW_TRACKING_URI"] = config.tracking.uri
        if args.print_config:
            print(json.dumps(to_dict(config), indent=2))
            return 0
        if config.eval.tasks:  # a task that cannot be scored fails here, not in the first evaluation
            try:
                check_tasks(config.eval.tasks)
            except commands.BadInput as error:
                raise commands.BadInput(f"eval.tasks: {error}") from None
        if files.is_uri(config.output_dir):  # a bucket that is missing or unreachable: one line, before any work
            files.check_bucket(config.output_dir)
        ray_jobs.connect(args.address)
        ensure_dataset(config)
        if config.train.init_from:  # a source that cannot start this run fails here, before any worker
            train_data, _ = open_datasets(config)
            check_start(config, tokenizer_path(config, train_data.manifest))
        try:
            result = fit(config, args.address, score_checkpoint)
        except Stopped:
            raise
        except Exception as error:
            raise commands.WorkFailed(f"{config.name} failed: {error}") from error
        run = RunDir(config.run_dir)
        run_id = run.tracking_run_id() if config.tracking.enabled else None
        latest = run.latest()
        if run_id and latest and config.tracking.register_model and os.environ.get(registry.TRACKING_URI):
            register_final_model(config, run_id, latest[1])
        print(f"trained {config.name}: {result.metrics} checkpoints in {run.checkpoints}")
        link = tracking.run_link(run_id) if run_id else None
        if link:
            print(f"{config.name}: MLflow run {link}")
        figures = run_goodput(run_id)
        if figures:
            print(f"{config.name}: {describe(figures)}")
        return 0

    return commands.run("openllama train", work)
