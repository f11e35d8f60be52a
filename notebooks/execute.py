"""Execute notebooks in place, keeping their outputs (every figure also as a PNG, so GitHub shows it).

    python notebooks/execute.py                          # every notebooks/*.ipynb
    python notebooks/execute.py notebooks/05_*.ipynb     # some of them
    python notebooks/execute.py --check                  # run them, write nothing

Each notebook runs in a fresh kernel of *this* Python interpreter (a kernelspec written to a
temporary folder, whatever kernels the machine has), with its own folder as the working directory,
exactly as ``tests/test_notebooks.py`` runs them. The notebooks call ``vit_lens.plot.notebook_renderer()``,
so with kaleido and a Chromium on the machine every ``fig.show()`` stores the interactive figure and
a PNG of it; without a browser this script refuses (the committed notebooks must have their PNGs).

The notebooks find the photos and the real checkpoints themselves (``$VIT_LENS_SHARED``, the folder
of ``$VIT_LENS_CHECKPOINTS``, or a ``shared/`` folder beside the repository); HTML files they save
go to a temporary folder (``$VIT_LENS_NOTEBOOK_OUT``), not into the repository. Cell timestamps are
dropped so that re-running changes only what the outputs change.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

NOTEBOOK_DIR = Path(__file__).resolve().parent
KERNEL_NAME = "vit_lens_notebooks_python"
CELL_TIMEOUT_S = 300


def write_kernelspec(root: Path) -> Path:
    """A kernelspec folder under ``root`` whose only kernel runs this very interpreter."""
    spec = Path(root) / KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "vit_lens notebooks",
        "language": "python",
    }))
    return Path(root)


def _clean(nb: Any) -> None:
    """Drop per-cell execution timestamps and the temporary kernel's name (the committed notebooks
    name the ordinary ``python3`` kernel)."""
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}


def execute(path: Path, *, kernel_dir: Path, out_dir: Path, env: Optional[Dict[str, str]] = None,
            timeout: int = CELL_TIMEOUT_S) -> Tuple[Any, float]:
    """Run one notebook top to bottom (errors stop it); returns (the executed notebook, seconds)."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    ksm = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    run_env = dict(os.environ if env is None else env)
    run_env["VIT_LENS_NOTEBOOK_OUT"] = str(out_dir)
    run_env.setdefault("OMP_NUM_THREADS", "2")
    run_env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    # the package the notebooks import is the one next to them (a checkout), ahead of any installed one
    run_env["PYTHONPATH"] = os.pathsep.join([str(NOTEBOOK_DIR.parent)] + [p for p in [run_env.get("PYTHONPATH")] if p])
    client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=False,
                            resources={"metadata": {"path": str(Path(path).resolve().parent)}})
    start = time.perf_counter()
    try:
        client.execute(env=run_env)
    finally:  # nbclient leaves a kernel manager it was given running: stop the kernel (and its memory) now
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    _clean(nb)
    return nb, time.perf_counter() - start


def figure_outputs(nb: Any) -> list:
    """(cell index, output) for every output that holds a plotly figure."""
    return [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.get("outputs", [])
            if "application/vnd.plotly.v1+json" in o.get("data", {})]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python notebooks/execute.py", description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: every notebooks/*.ipynb)")
    p.add_argument("--check", action="store_true", help="run them but write nothing back")
    args = p.parse_args(argv)
    sys.path.insert(0, str(NOTEBOOK_DIR.parent))
    from vit_lens import plot

    problem = plot.static_export_problem()
    if problem is not None and not args.check:
        print(f"execute.py: the notebooks would be saved without PNG figures: {problem}", file=sys.stderr)
        return 2
    paths = args.notebooks or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    import nbformat

    with tempfile.TemporaryDirectory() as tmp:
        kernels = write_kernelspec(Path(tmp) / "kernels")
        for path in paths:
            nb, seconds = execute(path, kernel_dir=kernels, out_dir=Path(tmp) / "out")
            figs = figure_outputs(nb)
            missing = [i for i, o in figs if "image/png" not in o.get("data", {})]
            if missing and problem is None:
                print(f"execute.py: {path.name}: figures without a PNG in cells {missing}", file=sys.stderr)
                return 1
            if not args.check:
                nbformat.write(nb, str(path))
            size = Path(path).stat().st_size / 1e6
            print(f"{path.name}: {seconds:.0f} s, {len(figs)} figures, {size:.2f} MB"
                  + ("" if args.check else " (written)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
