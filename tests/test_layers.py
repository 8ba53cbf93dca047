"""The layers of DESIGN.md hold in the code: each package imports only the layers above it, and no
module imports another module's private name. Read from the source (every import, including the
lazy ones inside functions), so a violation fails here before it confuses a reader."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "alexnet_ray"
SHARED = {"storage", "storage_retries", "checkpoint", "preprocess", "ray_cluster"}
INFERENCE = {"eval", "export", "visualize"}
# layer -> the layers its modules may import (its own included)
ALLOWED = {
    "model": {"model"},
    "parallel": {"model", "parallel"},
    "shared": SHARED,
    "data": {"data"} | SHARED,
    "train": {"model", "parallel", "data", "train"} | SHARED,
    "inference": {"model", "data"} | INFERENCE | SHARED,
    "benchmarks": None,  # measures everything
}


def _layer(top: str) -> str:
    if top in SHARED:
        return "shared"
    if top in INFERENCE:
        return "inference"
    return top


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue  # the package's lazy exports
        yield path, parts[0]


def _imports(path: Path):
    """(imported module, names) for every absolute import of alexnet_ray in the file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (this project imports absolutely)"
            if (node.module or "").startswith("alexnet_ray"):
                yield node.lineno, node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("alexnet_ray"):
                    yield node.lineno, alias.name, []


def _violations(path: Path, top: str) -> list[str]:
    allowed, problems = ALLOWED[_layer(top)], []
    for lineno, module, names in _imports(path):
        parts = module.split(".")
        targets = names if len(parts) == 1 else [parts[1]]  # `from alexnet_ray import storage`
        problems += [f"{path.name}:{lineno} imports alexnet_ray.{t}: layer {_layer(top)!r} may import {sorted(allowed)}"
                     for t in targets if allowed is not None and t not in allowed]
        private = [n for n in names if n.startswith("_")]
        if private:
            problems.append(f"{path.name}:{lineno} imports private {private} from {module}")
    return problems


@pytest.mark.parametrize("path, top", list(_modules()), ids=lambda v: str(v.relative_to(PACKAGE)) if isinstance(v, Path) else "")
def test_imports_follow_the_layers(path, top):
    assert _violations(path, top) == []


def test_the_check_sees_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom alexnet_ray import storage\n\n\ndef f():\n"
                   "    from alexnet_ray.train.worker import _quiet\n")
    assert _violations(bad, "model") == [
        "bad.py:2 imports alexnet_ray.storage: layer 'model' may import ['model']",
        "bad.py:6 imports alexnet_ray.train: layer 'model' may import ['model']",
        "bad.py:6 imports private ['_quiet'] from alexnet_ray.train.worker",
    ]
    assert _violations(bad, "eval") == [
        "bad.py:6 imports alexnet_ray.train: layer 'inference' may import "
        "['checkpoint', 'data', 'eval', 'export', 'model', 'preprocess', 'ray_cluster', 'storage', "
        "'storage_retries', 'visualize']",
        "bad.py:6 imports private ['_quiet'] from alexnet_ray.train.worker",
    ]
    bad.write_text("from .network import AlexNet\n")
    with pytest.raises(AssertionError, match="relative import"):
        _violations(bad, "model")
