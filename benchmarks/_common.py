"""The flags and set-up lines the benchmark scripts share: ``--device``, ``--threads``, ``--seed``,
``--dtype``, the device check, the random-initialised timm model, the sample photo pair, and the
tolerance with which a low-precision result is compared.

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import add_common_args, random_timm, setup

    p = argparse.ArgumentParser()
    add_common_args(p, device="cpu", threads=2, seed=0, dtype="float32")  # each flag's default; False: no flag
    args = p.parse_args(argv)
    device, dtype = setup(args, p)  # threads, seed; refuses a device that is not there (exit 2)
    tm = random_timm(args.model, seed=args.seed)

Each script keeps its own flags and defaults: a keyword of :func:`add_common_args` is the default of
that flag, and ``False`` leaves the flag out (``threads=None``: torch's own choice of threads).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch

SHARED = Path(os.environ.get("VIT_LENS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WEIGHTS = Path(os.environ.get("VIT_LENS_CHECKPOINTS", SHARED / "weights"))
DTYPES = ("float32", "bfloat16", "float16")
#: a result in a low-precision dtype agrees with another computation of the same thing in that dtype
#: when they differ by at most AGREE_ULPS x eps(dtype) x the largest |value| (see :func:`tolerance`)
AGREE_ULPS = 4

_Flag = Union[str, int, None, bool]


def add_common_args(parser: argparse.ArgumentParser, *, device: _Flag = "cpu", threads: _Flag = 2,
                    seed: _Flag = False, dtype: _Flag = False, device_help: Optional[str] = None) -> None:
    """Add the shared flags to ``parser``. Each keyword is that flag's default; ``False`` leaves the
    flag out (``threads=None`` keeps the flag, defaulting to torch's own choice).

    * ``--device`` (str): ``cpu`` or ``cuda[:N]``;
    * ``--threads`` (int): torch's CPU threads;
    * ``--seed`` (int): torch's seed (set by :func:`setup`);
    * ``--dtype`` (one of :data:`DTYPES`): the precision of the model and its inputs.
    """
    if device is not False:
        parser.add_argument("--device", default=device, help=device_help or f"cpu or cuda (default {device})")
    if threads is not False:
        parser.add_argument("--threads", type=int, default=threads,
                            help="torch threads (default: torch's choice)" if threads is None else
                            f"torch threads (default {threads})")
    if seed is not False:
        parser.add_argument("--seed", type=int, default=seed, help=f"torch's random seed (default {seed})")
    if dtype is not False:
        if dtype not in DTYPES:
            raise ValueError(f"dtype default {dtype!r} is not one of {', '.join(DTYPES)}")
        parser.add_argument("--dtype", default=dtype, choices=list(DTYPES),
                            help=f"precision of the model and its inputs (default {dtype})")


def check_device(name: str) -> torch.device:
    """``torch.device(name)``, refused (``InputError``, a ValueError) where it is not usable here: a
    CUDA device without CUDA (or past the last GPU), or a name torch does not know."""
    from vit_lens.core.errors import InputError

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"--device {name!r} is not a device torch knows ({e}); use cpu or cuda (cuda:N for GPU N)") \
            from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a build without CUDA"
            raise InputError(f"--device {name}: torch {torch.__version__} ({build}) sees no CUDA device here; "
                             "run with --device cpu, or on a machine with a GPU")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise InputError(f"--device {name}: there {'is' if n == 1 else 'are'} only {n} CUDA device"
                             f"{'' if n == 1 else 's'} here (cuda:0..cuda:{n - 1}); pick one of them")
    return device


def setup(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> Tuple[torch.device, torch.dtype]:
    """Apply the shared flags that :func:`add_common_args` added: set torch's threads (where
    ``--threads`` is given) and seed (``--seed``), check ``--device``; returns ``(device, dtype)``
    (cpu and float32 for a script without those flags). A device that is not usable is refused
    through ``parser.error`` (exit status 2, the usage line) when ``parser`` is given, else with an
    ``InputError``."""
    from vit_lens.core.errors import InputError

    try:
        device = check_device(getattr(args, "device", "cpu"))
    except InputError as e:
        if parser is None:
            raise
        parser.error(str(e))
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "seed", None) is not None:
        torch.manual_seed(args.seed)
    return device, getattr(torch, getattr(args, "dtype", "float32"))


def random_timm(name: str, *, seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs).eval()`` after ``torch.manual_seed(seed)``:
    random weights (the hub is unreachable; speed does not depend on the weights), float32, CPU."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def where(device: torch.device) -> str:
    """The device in words: the GPU's name, or ``CPU, N threads``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def photo_pair(model: Any, device: Any = None, dtype: Optional[torch.dtype] = None):
    """A clean / corrupted pair, batch 1 each, ``[1, C, H, W]`` on ``device`` in ``dtype`` (default: the
    model's; ``model.preprocess`` gives the model's dtype, so a float32 pair needs a float32 model): the sample
    photos chelsea.png and coffee.png (``$VIT_LENS_SHARED/images/photos``) when present, else two
    seeded random images. Returns ``(clean, corrupted, names)``, ``names`` the two file names or None."""
    photos = SHARED / "images" / "photos"
    a, b = photos / "chelsea.png", photos / "coffee.png"
    if a.exists() and b.exists():
        clean, corrupted, names = model.preprocess([str(a)]), model.preprocess([str(b)]), (a.name, b.name)
    else:
        g = torch.Generator().manual_seed(1)
        shape = (1, model.cfg.in_chans, *model.cfg.image_size)
        clean, corrupted, names = torch.randn(shape, generator=g), torch.randn(shape, generator=g), None
    dtype = dtype or model.dtype
    return clean.to(device=device, dtype=dtype), corrupted.to(device=device, dtype=dtype), names


def tolerance(dtype: torch.dtype, scale: float) -> float:
    """The largest difference allowed between two computations of the same values in ``dtype``
    (e.g. a batched patching engine and a naive one-run-per-patch loop, both in bfloat16):
    ``AGREE_ULPS x eps(dtype) x scale``, ``scale`` the largest |value| compared.

    Why: the two compute the same function with the operations grouped differently (batched
    matrix products, runs started from a cached residual stream, keys and values reused), so
    they differ by rounding. The logit at the end is itself rounded to the dtype: its spacing
    there is eps x 2^floor(log2|value|), between eps/2 and eps times |value|, so two correct results
    one rounding apart differ by up to eps x scale; the rounding of the residual stream upstream
    adds a few more such steps. bfloat16 (eps 2^-7 = 7.8e-3) and float16 (eps 2^-10 = 9.8e-4)
    get 4 of them: measured on a random ViT-B/16 in bfloat16 on a CPU (3 layers x 8 patches), the
    engine and the naive loop differed by one step (0.016 at a logit of 2.2). A wrong patch moves
    the metric by the patch's effect, which this check sees only where the effect is larger than
    the tolerance: the scripts print the clean-corrupted gap beside it.
    """
    return AGREE_ULPS * torch.finfo(dtype).eps * float(scale)
