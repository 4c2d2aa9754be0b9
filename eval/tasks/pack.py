"""Loads the pack's JSONL files by paths relative to this folder, so the tasks run from any directory.

lm-eval hands `dataset_kwargs` to `datasets.load_dataset`, which resolves relative `data_files` against the
current directory; each task here names this function as its `custom_dataset` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def load_json(data_files: dict[str, str], **task_metadata: Any) -> datasets.DatasetDict:
    """`load_dataset("json", data_files=...)` with each path taken relative to the task pack."""
    absolute = {split: str(HERE / path) for split, path in data_files.items()}
    for path in absolute.values():
        if not Path(path).is_file():
            raise FileNotFoundError(f"task pack data file {path} is missing")
    return datasets.load_dataset("json", data_files=absolute)
