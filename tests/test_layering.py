"""The package's layering, read from its source: analysis modules import the core, the model and
the components, never another module's private names (one concept, one home)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "vit_lens"
ANALYSES = ("class_space", "attribution", "patching", "ablation", "explain", "probing", "edges", "attribution_patching")


def _module_of(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package_of(module: str) -> str:
    """``vit_lens.loading.sources.timm`` -> ``vit_lens.loading``: private names may cross files inside
    one subpackage, not between top-level modules."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (PKG / parts[-1]).is_dir() else module


def _private_imports(path: Path):
    """(line, imported module, name) for every private name a file takes from another vit_lens module,
    by ``from x import _name`` or by ``module._name`` on an imported vit_lens module."""
    me = _module_of(path)
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vit_lens"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__") and _package_of(node.module) != _package_of(me):
                    yield node.lineno, node.module, a.name
                if node.module == "vit_lens" or (PKG / node.module.split(".")[-1]).exists():
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("vit_lens."):
                    aliases[a.asname or a.name.split(".")[0]] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            target = aliases[node.value.id]
            if target.startswith("vit_lens.") and _package_of(target) != _package_of(me):
                yield node.lineno, target, node.attr


def test_no_module_imports_another_modules_private_names():
    found = [f"{p.relative_to(PKG.parent)}:{line}: {mod}.{name}"
             for p in sorted(PKG.rglob("*.py")) for line, mod, name in _private_imports(p)]
    assert not found, "private names used across modules (move the helper to vit_lens.core or make it public):\n" + "\n".join(found)


def test_analysis_modules_import_only_lower_layers():
    """An analysis module may use another analysis module's public functions, but the shared
    vocabulary (positions, targets, layers, hook names, cache access) comes from vit_lens.core."""
    shared = {"position_mask", "resolve_targets", "resolve_target", "resolve_layers", "hook_names", "hook_name",
              "head_mask", "grid_of", "cache_get", "position_labels", "as_batch", "chunks"}
    bad = []
    for name in ANALYSES:
        tree = ast.parse((PKG / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in {f"vit_lens.{a}" for a in ANALYSES}:
                bad += [f"{name}.py:{node.lineno} takes {a.name} from {node.module}" for a in node.names if a.name in shared]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_private_import(tmp_path, monkeypatch):
    """The check itself can fail: a file importing another module's private helper is reported."""
    import sys

    src = "from vit_lens.patching import _layout\nimport vit_lens.explain as E\nE._sorted_layers\n"
    p = tmp_path / "vit_lens" / "fake_analysis.py"
    p.parent.mkdir()
    p.write_text(src)
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path / "vit_lens")
    (tmp_path / "vit_lens" / "patching.py").write_text("")
    (tmp_path / "vit_lens" / "explain.py").write_text("")
    found = list(_private_imports(p))
    assert [(m, n) for _, m, n in found] == [("vit_lens.patching", "_layout"), ("vit_lens.explain", "_sorted_layers")]
