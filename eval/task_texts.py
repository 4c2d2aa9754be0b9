"""What eval's tasks show a model, as plain texts: `openllama eval texts TASK... --out FILE`.

Decontamination removes training documents that quote an evaluation item, and so it needs each item's text.
Eval owns its tasks (the local pack in eval/tasks, lm-eval's registry), so eval writes their texts to a file,
`{task: [item text, ...]}`, and the data stage reads only that file (`data dedup --decontaminate FILE`); the
pipeline writes it for the tasks it evaluates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openllama import files
from openllama.commands import BadInput
from openllama.config import METAVAR, POSITIONAL

TASK_PACK = Path(__file__).resolve().parent / "tasks"
LOCAL_PACK = "openllama_local"
# the fields of each local task's items that hold what the model is shown or asked to produce
LOCAL_TASK_FIELDS = {
    "local_arc": ("question", "choices.text"),
    "local_hellaswag": ("activity_label", "ctx", "endings"),
    "local_piqa": ("goal", "sol1", "sol2"),
    "local_boolq": ("passage", "question"),
    "local_arithmetic": ("question", "answer"),
    "local_text_perplexity": ("text",),
}


@dataclass
class TaskTextsConfig:
    """What `openllama eval texts` runs with."""

    out: str  # the JSON file to write, local or URI: {task: [item text, ...]}
    # local tasks, the local pack (openllama_local), or lm-eval tasks whose datasets are cached
    tasks: list[str] = field(default_factory=lambda: [LOCAL_PACK], metadata={POSITIONAL: True, METAVAR: "TASK"})

    def __post_init__(self) -> None:
        files.check_location(self.out)


class _PackLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs, whose `!function` tags name Python callables we do not need."""


_PackLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _field_texts(record: dict, field: str) -> list[str]:
    """The strings at a dotted `field` of an item (a string, or a list of strings)."""
    value: Any = record
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def local_pack_items(pack: Path) -> dict[str, list[str]]:
    """{task: item texts} of every task of the local pack (eval/tasks), from the files its YAMLs name."""
    items: dict[str, list[str]] = {}
    for path in sorted(pack.glob("*.yaml")):
        spec = yaml.load(path.read_text(), Loader=_PackLoader) or {}
        data_files = (spec.get("dataset_kwargs") or {}).get("data_files") or {}
        if not isinstance(spec.get("task"), str) or "test" not in data_files:
            continue
        name = spec["task"]
        fields = LOCAL_TASK_FIELDS.get(name)
        texts = []
        for line in (pack / data_files["test"]).read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                chosen = fields or [k for k, v in record.items() if k != "id" and isinstance(v, str)]
                texts.append(" ".join(t for f in chosen for t in _field_texts(record, f)))
        items[name] = texts
    return items


def lm_eval_items(name: str) -> list[str]:
    """The decontamination queries of lm-eval task `name` (its test split, else validation), from local caches."""
    try:
        # lm-eval is the `eval` extra and imports torch: only a run that names one of its tasks pays for it
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise BadInput(f"decontaminate: task {name!r} is not in the local pack and lm-eval is not "
                                "installed; pip install 'openllama-ray[eval]'") from None
    try:
        tasks = get_task_dict([name], TaskManager())
    except Exception as error:  # lm-eval raises bare KeyError/ValueError/connection errors for a missing task
        raise BadInput(f"decontaminate: lm-eval task {name!r} cannot be loaded offline ({error}); "
                                "download its dataset first, or leave it out") from None
    texts: list[str] = []
    for task in _leaf_tasks(tasks):
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        query = task.doc_to_decontamination_query if task.should_decontaminate() else task.doc_to_text
        texts += [str(query(doc)) for doc in docs]
    return texts


def _leaf_tasks(tree: dict) -> list[Any]:
    """The tasks of lm-eval's task dict, groups flattened."""
    return [t for v in tree.values() for t in (_leaf_tasks(v) if isinstance(v, dict) else [v])]


def eval_items(names: list[str], pack: Path) -> dict[str, list[str]]:
    """{task: item texts} for each name: the local pack (all of it, or a task), else an lm-eval task."""
    local = local_pack_items(pack) if names else {}
    chosen: dict[str, list[str]] = {}
    for name in names:
        if name == LOCAL_PACK:
            chosen.update(local)
        elif name in local:
            chosen[name] = local[name]
        else:
            chosen[name] = lm_eval_items(name)
    return chosen


def task_texts(names: list[str]) -> dict[str, list[str]]:
    """{task: item texts} of `names`, from the local pack or, for other names, lm-eval's cached datasets."""
    return eval_items(names, TASK_PACK)


def texts_command(config: TaskTextsConfig) -> None:
    """Write the item texts of eval tasks to a file, for `openllama data dedup --decontaminate FILE`."""
    texts = task_texts(config.tasks)
    files.write_text(config.out, json.dumps(texts, indent=0, sort_keys=True, ensure_ascii=False))
    print(f"{config.out}: {sum(map(len, texts.values())):,} items of {len(texts)} tasks ({', '.join(sorted(texts))})")
