"""The house rules that a test can check: data flows one way between the stage packages (no module imports a
stage above its own), and the command line starts without importing torch, pandas or dask."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sysu30k"

# Bottom to top. A module may import its own stage and the stages below it, never one above.
LAYERS = [
    {"errors", "options", "lazy", "manifests"},     # the base: no stage
    {"io"},
    {"release"},
    {"synth"},
    {"ingest"},
    {"split"},
    {"loader"},
    {"model"},
    {"evaluation"},                                  # the trainers validate with the evaluator
    {"train"},
    {"cli", "doctor", "__main__", "__init__"},       # the command line on top
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def stage_of(module: str) -> str:
    """``sysu30k.ingest.plan`` -> ``ingest``; ``sysu30k.cli`` -> ``cli``; ``sysu30k`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out.append((name, path))
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every sysu30k module ``name`` imports, at the top or inside a function (relative ones resolved)."""
    tree = ast.parse(path.read_text("utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sysu30k"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "sysu30k":                      # from sysu30k import manifests / __version__
                found |= {f"sysu30k.{a.name}" if a.name in RANK else "sysu30k" for a in node.names}
            elif target.split(".")[0] == "sysu30k":
                found.add(target)
    return found


def test_every_module_belongs_to_a_layer():
    assert {stage_of(n) for n, _ in modules()} <= set(RANK), "a new subpackage needs a place in LAYERS"


@pytest.mark.parametrize("name,path", modules(), ids=[n for n, _ in modules()])
def test_no_module_imports_a_stage_above_its_own(name, path):
    here = RANK[stage_of(name)]
    upward = sorted(t for t in imports(name, path) if RANK[stage_of(t)] > here)
    assert not upward, f"{name} ({stage_of(name)}) imports {upward}, which sit above it"


def test_the_walk_sees_lazy_and_relative_imports():
    # sysu30k.train.loop imports the evaluator inside a function and the model relatively
    found = imports("sysu30k.train.loop", PACKAGE / "train" / "loop.py")
    assert "sysu30k.evaluation.run" in found and "sysu30k.model" in found


def test_the_command_line_starts_without_torch_pandas_or_dask():
    probe = ("import sys, sysu30k.cli; heavy = [m for m in ('torch', 'pandas', 'dask') if m in sys.modules]; "
             "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_readme_map_names_every_subpackage_and_module():
    readme = (PACKAGE.parent / "README.md").read_text("utf-8")
    section = readme[readme.index("## Architecture"):readme.index("## Source of facts")]
    packages = {p.parent.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("__init__.py")} - {"."}
    missing = [p for p in sorted(packages)
               if f"`sysu30k/{p}/`" not in section and f"`{p.split('/')[-1]}/`" not in section]
    modules = {p.stem for p in PACKAGE.rglob("*.py") if p.stem not in ("__init__", "__main__")}
    missing += [m for m in sorted(modules) if f"`{m}`" not in section and f"{m}.py" not in section]
    assert not missing, f"README's architecture section does not name {missing}"
