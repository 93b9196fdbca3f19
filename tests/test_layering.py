"""The package's layering (GUIDE.md): pure model/diffusion/loss code does no I/O and reads no config."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "lidiff"
PURE = ("nn", "models", "diffusion", "ldm", "losses")
FORBIDDEN_IMPORTS = ("orbax", "tensorflow", "tensorflow_datasets", "ml_collections", "absl", "PIL", "torch")
# Who may import whom: a package may import only itself and those listed.
ALLOWED = {
    "nn": set(),
    "diffusion": set(),
    "models": {"nn"},
    "ldm": {"nn", "models", "diffusion", "parallel"},  # lidiff/ldm.py: the stage-2 model (parallel: its mesh)
    "losses": {"nn", "models", "diffusion", "ldm"},
}


def _python_files(package: str):
    if (ROOT / f"{package}.py").is_file():
        return [ROOT / f"{package}.py"]
    return sorted((ROOT / package).rglob("*.py"))


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_do_no_io_and_read_no_config(package):
    files = _python_files(package)
    assert files, f"no sources found in lidiff/{package}"
    problems = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in _imports(tree):
            top = name.split(".")[0]
            if top in FORBIDDEN_IMPORTS:
                problems.append(f"{path.name} imports {name}")
            if top == "lidiff":
                sub = name.split(".")[1] if "." in name else ""
                if sub and sub != package and sub not in ALLOWED[package]:
                    problems.append(f"{path.name} imports {name} (lidiff/{package} may use {sorted(ALLOWED[package])})")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "open"):
                problems.append(f"{path.name}:{node.lineno} calls {node.func.id}()")
    assert not problems, "\n".join(problems)


def test_no_private_jax_apis():
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        for name in _imports(ast.parse(path.read_text())):
            if name.startswith("jax._src"):
                problems.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not problems, "\n".join(problems)
