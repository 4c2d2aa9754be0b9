"""The shape of the code (../shared/ARCHITECTURE.md), checked over the import graph of the product's modules.

Every arrow points down: the platform base imports no stage and not the roof; data imports neither train
nor eval; train does not import eval; of data, train and eval use only the modules that read what data made
(the shards, the mixture, the tokenizer); `train/model.py` is the architecture alone. An import by name
(`importlib.import_module("openllama.eval")`, `importlib.resources.files(...)`, a "module:function" entry)
counts as an import. Nothing imports a leading-underscore name from another module, imports sit at module
top unless a comment says why, and no product module injects faults.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"platform": "openllama", "data": "openllama.data", "train": "openllama.train", "eval": "openllama.eval"}
BASE = {"openllama.config", "openllama.tracking", "openllama.ray_jobs", "openllama.files", "openllama.services",
        "openllama.processes", "openllama.commands"}
ROOF = {"openllama.cli", "openllama.pipeline", "openllama.show", "openllama.training"}
STAGES = ("openllama.data", "openllama.train", "openllama.eval")
# what the stages after data may use of it: the readers of the packed shards, the mixture and the tokenizer
DATA_READERS = ("openllama.data.shards", "openllama.data.mixture", "openllama.data.tokenizer")
BY_NAME = {"import_module", "files", "find_spec", "__import__"}  # functions that import a module named by a string
ENTRY = re.compile(r"^openllama(\.\w+)*:\w+$")  # a "module:function" string, imported when called


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (or module.name for `from module import name`)
    names: tuple[str, ...]
    line: int
    top_level: bool
    commented: bool  # a comment on its line or the line above says why it is where it is


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(REPO).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def product_files() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (REPO / folder).rglob("*.py") if "tasks" not in p.parts)


def imports_of(path: Path) -> list[Import]:
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    module = module_name(path)
    top = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` and the like at module level count as top level
        if isinstance(node, ast.If | ast.Try):
            top |= {id(child) for child in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [(node.module, tuple(alias.name for alias in node.names))]
        else:
            continue
        commented = says_why(lines, node.lineno - 1)
        found += [Import(module, target, names, node.lineno, id(node) in top, commented) for target, names in targets]
    return found + imports_by_name(tree, module)


def imports_by_name(tree: ast.AST, module: str) -> list[Import]:
    """Modules of ours named by a string where a string imports them: an argument of `import_module` and the
    like, or a "module:function" entry. They count as top-level imports (they need no comment)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            value = node.args[0].value
            if name in BY_NAME and isinstance(value, str) and value.split(".")[0] == "openllama":
                found.append(Import(module, value, (), node.lineno, True, True))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ENTRY.match(node.value):
            found.append(Import(module, node.value.split(":")[0], (), node.lineno, True, True))
    return found


def says_why(lines: list[str], index: int) -> bool:
    """A comment on the import's line, or above the block of imports it belongs to."""
    if "#" in lines[index]:
        return True
    while index > 0 and (lines[index - 1].strip().startswith(("from ", "import ")) or not lines[index - 1].strip()):
        index -= 1
    return index > 0 and lines[index - 1].strip().startswith("#")


ALL = [imp for path in product_files() for imp in imports_of(path)]


def ours(imp: Import) -> bool:
    return imp.target == "openllama" or imp.target.startswith("openllama.")


def within(module: str, package: str) -> bool:
    """Whether `module` is `package` or inside it (`openllama.training` is not inside `openllama.train`)."""
    return module == package or module.startswith(package + ".")


def reaches(imp: Import, prefix: str) -> bool:
    """Whether `imp` imports module `prefix` or something inside it (also as `from openllama import data`)."""
    targets = [imp.target] + [f"{imp.target}.{name}" for name in imp.names]
    return any(t == prefix or t.startswith(prefix + ".") for t in targets)


def where(imp: Import) -> str:
    return f"{imp.module}:{imp.line} imports {imp.target} {list(imp.names) or ''}"


def test_the_import_graph_is_found():
    modules = {imp.module for imp in ALL}
    assert {"openllama.config", "openllama.train.model", "openllama.eval.backend", "openllama.data.shards"} <= modules


def test_the_platform_base_imports_no_stage_and_not_the_roof():
    up = [where(imp) for imp in ALL if imp.module in BASE and any(reaches(imp, p) for p in (*STAGES, *ROOF))]
    assert not up, up


@pytest.mark.parametrize("stage, forbidden", [
    ("openllama.data", ("openllama.train", "openllama.eval", *ROOF)),
    ("openllama.train", ("openllama.eval", *ROOF)),
    ("openllama.eval", ROOF),
])
def test_stages_import_only_downwards(stage, forbidden):
    up = [where(imp) for imp in ALL if within(imp.module, stage) and any(reaches(imp, p) for p in forbidden)]
    assert not up, up


@pytest.mark.parametrize("stage", ["openllama.train", "openllama.eval"])
def test_stages_after_data_use_only_the_modules_that_read_what_data_made(stage):
    shortcuts = [where(imp) for imp in ALL if within(imp.module, stage) and reaches(imp, "openllama.data")
                 and not any(reaches(imp, reader) for reader in DATA_READERS)]
    assert not shortcuts, shortcuts


def test_data_does_not_use_evals_library():
    """What eval runs reaches data as texts in a file (`eval texts`, `data dedup --decontaminate FILE`)."""
    uses = [where(imp) for imp in ALL if within(imp.module, "openllama.data") and imp.target.split(".")[0] == "lm_eval"]
    assert not uses, uses


def test_imports_by_name_are_found():
    """The roof's verb table is a set of imports by name: were they not found, a shortcut could hide there."""
    cli = {imp.target for imp in ALL if imp.module == "openllama.cli"}
    assert {"openllama.data.clean", "openllama.eval.task_texts", "openllama.training"} <= cli


def test_the_model_file_imports_no_ray_mlflow_orbax_or_platform_module():
    model = [imp for imp in ALL if imp.module == "openllama.train.model"]
    bad = [where(imp) for imp in model
           if imp.target.split(".")[0] in ("ray", "mlflow", "orbax")
           or (ours(imp) and not reaches(imp, "openllama.train"))]
    assert model and not bad, bad


def test_no_module_imports_a_private_name_of_another():
    private = [where(imp) for imp in ALL if ours(imp) and any(n.startswith("_") for n in imp.names)]
    private += [where(imp) for imp in ALL if ours(imp) and any(part.startswith("_") for part in imp.target.split("."))]
    assert not private, private


def test_imports_inside_functions_say_why():
    silent = [where(imp) for imp in ALL if not imp.top_level and not imp.commented]
    assert not silent, silent


FAULT_HOOKS = re.compile(r"os\._exit|FaultSection|kill_at_step|nan_at_step|STOP_AFTER|OPENLLAMA_FAULT|poison")


def test_no_product_module_injects_faults():
    offenders = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in product_files()
                 for m in [FAULT_HOOKS.search(p.read_text())] if m]
    assert not offenders, offenders
