"""Static types a user can rely on (issue 11 item 8).

* ``import vit_lens`` is lazy at run time, yet a type checker sees the real objects: the
  ``if TYPE_CHECKING:`` imports in ``vit_lens/__init__.py`` name exactly the lazy names.
* mypy on a user script resolves ``HookedViT``, ``run_with_cache`` and the analysis functions to
  their real types (not ``Any``), and rejects a call that passes something else as the model.
* mypy reports zero errors in the modules listed in ``COVERED``.

The mypy runs skip only when mypy is not installed (``pip install -e '.[dev]'`` installs it). They
share the repository's ``.mypy_cache`` (git-ignored): a cold run analyses torch, timm and
transformer_lens once (about 30-40 s on 2 cores); later runs take seconds.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: the modules held at zero mypy errors (every module of vit_lens)
COVERED = [
    "vit_lens/__init__.py",
    "vit_lens/core",
    "vit_lens/config.py",
    "vit_lens/model.py",
    "vit_lens/components",
    "vit_lens/data.py",
    "vit_lens/preprocess.py",
    "vit_lens/samples.py",
    "vit_lens/loading/__init__.py",
    "vit_lens/loading/checkpoints.py",
    "vit_lens/loading/saving.py",
    "vit_lens/loading/sources/open_clip.py",
    "vit_lens/loading/sources/hf.py",
    "vit_lens/loading/sources/__init__.py",
    "vit_lens/loading/processing.py",
    "vit_lens/loading/registry.py",
    "vit_lens/loading/timm_vit.py",
    "vit_lens/attribution_patching.py",
    "vit_lens/edges.py",
    "vit_lens/class_space.py",
    "vit_lens/explain.py",
    "vit_lens/cli.py",
    "vit_lens/ablation.py",
    "vit_lens/attribution.py",
    "vit_lens/probing.py",
    "vit_lens/plot.py",
    "vit_lens/loading/sources/timm.py",
    "vit_lens/clip.py",
    "vit_lens/runs",
    "vit_lens/results.py",
    "vit_lens/__main__.py",
    "vit_lens/perf.py",
    "vit_lens/patching.py",
]

USER_SCRIPT = '''\
import torch
import vit_lens
from vit_lens import HookedViT

model = HookedViT.from_pretrained("vit_tiny_patch16_224")
images = model.preprocess(["cat.jpg"])
logits, cache = model.run_with_cache(images)
reveal_type(model)  # R:model
reveal_type(model.run_with_cache(images))  # R:run_with_cache
reveal_type(model.run_with_cache(images, return_type=None))  # R:run_with_cache_none
reveal_type(model.run_with_cache(images, return_cache_object=False))  # R:run_with_cache_dict
reveal_type(cache)  # R:cache
reveal_type(vit_lens.identify(model, images))  # R:identify
reveal_type(vit_lens.dla(model, cache, "tabby cat"))  # R:dla
metric = vit_lens.logit_metric("tabby cat")
reveal_type(metric)  # R:logit_metric
reveal_type(vit_lens.patch_positions_sweep(model, images, images, metric))  # R:sweep
reveal_type(vit_lens.identify)  # R:identify_sig
reveal_type(vit_lens.dla)  # R:dla_sig
vit_lens.identify("vit_tiny_patch16_224", images)  # E:not_a_model
vit_lens.dla(model, images, "tabby cat")  # E:not_a_cache
'''

TENSOR = "torch._tensor.Tensor"
CACHE = "transformer_lens.ActivationCache.ActivationCache"
EXPECTED = {
    "model": "vit_lens.model.HookedViT",
    "run_with_cache": f"tuple[{TENSOR}, {CACHE}]",
    "run_with_cache_none": f"tuple[None, {CACHE}]",
    "run_with_cache_dict": f"tuple[{TENSOR} | None, dict[str, {TENSOR}]]",
    "cache": CACHE,
    "identify": f"tuple[vit_lens.class_space.IdentifiabilityResult, {TENSOR}]",
    "dla": "vit_lens.attribution.DLAResult",
    "logit_metric": "vit_lens.patching.ClassMetric",
    "sweep": "vit_lens.patching.PatchingResult",
}

needs_mypy = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install -e '.[dev]' installs it)"
)


# ------------------------------------------------------------------ lazy names seen by type checkers (no mypy needed)
def _type_checking_imports(tree: ast.Module) -> dict:
    found = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom), ast.unparse(imp)
                for alias in imp.names:
                    found[alias.asname or alias.name] = (imp.module, alias.name)
    return found


def test_type_checking_imports_match_lazy_names():
    src = (ROOT / "vit_lens" / "__init__.py").read_text()
    tree = ast.parse(src)
    lazy = next(
        ast.literal_eval(n.value) for n in tree.body
        if isinstance(n, ast.Assign) and [ast.unparse(t) for t in n.targets] == ["_LAZY"]
    )
    seen = _type_checking_imports(tree)
    assert set(seen) == set(lazy), (
        f"names lazy but invisible to type checkers: {sorted(set(lazy) - set(seen))}; "
        f"imported for type checkers but not lazy: {sorted(set(seen) - set(lazy))}"
    )
    for name, module in lazy.items():
        assert seen[name] == (module, name), f"{name}: lazy from {module}, TYPE_CHECKING import from {seen[name]}"


def test_py_typed_is_shipped():
    assert (ROOT / "vit_lens" / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    data = re.search(r"^\[tool\.setuptools\.package-data\]\s*\nvit_lens\s*=\s*\[(.*?)\]", pyproject, re.M | re.S)
    assert data is not None and '"py.typed"' in data.group(1)


def test_import_stays_lazy():
    """The TYPE_CHECKING imports cost nothing at run time: no torch, plotly or analysis module."""
    code = "import sys, vit_lens; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'plotly', 'timm', 'transformer_lens') or m.startswith('vit_lens.')))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ mypy
@pytest.fixture(scope="module")
def mypy_run(tmp_path_factory):
    """One mypy run over the covered modules and the user script (errors of other modules silenced)."""
    # a fresh module name every run: mypy's cache would otherwise replay an earlier run's messages (with that
    # run's path) for an unchanged script of the same name
    script = tmp_path_factory.mktemp("typing") / f"user_script_{os.getpid()}_{time.time_ns()}.py"
    script.write_text(USER_SCRIPT)
    env = {**os.environ, "MYPYPATH": str(ROOT), "PYTHONPATH": str(ROOT)}  # this checkout's vit_lens, not an installed one
    cmd = [
        sys.executable, "-m", "mypy",
        "--config-file", str(ROOT / "pyproject.toml"),
        "--cache-dir", str(ROOT / ".mypy_cache"),
        "--follow-imports=silent",
        "--show-error-codes", "--no-color-output", "--no-error-summary",
        *COVERED, str(script),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode not in (0, 1):
        pytest.fail(f"mypy crashed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return script, proc.stdout.splitlines()


def _lines_of(out, path):
    return [l for l in out if l.startswith(str(path) + ":")]


@needs_mypy
def test_mypy_covered_modules_have_zero_errors(mypy_run):
    script, out = mypy_run
    errors = [l for l in out if ": error:" in l and not l.startswith(str(script))]
    assert errors == [], f"{len(errors)} mypy errors in the covered modules:\n" + "\n".join(errors)


@needs_mypy
def test_user_script_sees_real_types(mypy_run):
    script, out = mypy_run
    src = script.read_text().splitlines()
    tags = {}
    for i, line in enumerate(src, 1):
        m = re.search(r"# ([RE]):(\w+)$", line)
        if m:
            tags[i] = (m.group(1), m.group(2))
    notes, errors = {}, {}
    for l in _lines_of(out, script):
        m = re.match(rf"{re.escape(str(script))}:(\d+): (note|error): (.*)$", l)
        assert m, l
        ln, kind, msg = int(m.group(1)), m.group(2), m.group(3)
        if kind == "note" and msg.startswith("Revealed type is "):
            notes[ln] = msg[len("Revealed type is "):].strip('"').replace("builtins.", "")  # older mypy prints builtins.dict
        elif kind == "error":
            errors.setdefault(ln, []).append(msg)
    revealed = {tags[ln][1]: t for ln, t in notes.items()}
    for what, expected in EXPECTED.items():
        assert revealed.get(what) == expected, f"reveal_type({what}): {revealed.get(what)!r}, expected {expected!r}"
    # the analysis functions' signatures name the real classes, not Any
    assert "model: vit_lens.model.HookedViT" in revealed["identify_sig"], revealed["identify_sig"]
    assert f"cache: {CACHE} | dict[str, {TENSOR}]" in revealed["dla_sig"], revealed["dla_sig"]
    # mypy rejects a string as the model and images as the cache -- and nothing else in the script
    expected_errors = {ln for ln, (k, _) in tags.items() if k == "E"}
    assert set(errors) == expected_errors, f"mypy errors in the user script: {errors}"
    for ln in expected_errors:
        assert any("[arg-type]" in e for e in errors[ln]), errors[ln]
