"""Linear-probe baseline: closed-form ridge probes per layer, component and position.

The seed paper (Vilas et al., NeurIPS 2023, Sec. 7) compares decoding classes by projecting hidden
states onto the class embeddings with decoding them by linear probes trained for the purpose
(ridge regression onto +-1 one-vs-rest targets, one probe per layer and token position). This
module fits those probes in closed form with torch (no scikit-learn), batched over positions:

* :func:`ridge_fit` -- ridge regression with an unpenalised intercept, many problems at once;
* :func:`fit_ridge_probe` -- a classifier probe (+-1 targets) -> :class:`RidgeProbe`;
* :func:`collect_activations` -- cached activations per (component, layer) at chosen positions;
* :func:`linear_probe_sweep` -- train on one set, test on another, per layer x component x
  position, with the class-space projection's top-1 on the same tokens beside it;
* :func:`probe_importance` -- the paper's "probe ranking" of image tokens (the rank of the target
  class under each layer's probe at each patch, summed over layers), as an importance map for
  :func:`vit_lens.explain.perturbation_curve`.

Honest use: a probe needs several training images per class and disjoint test images. With the
20 labelled images shipped in ``../shared`` (one per class) no probe can generalise to new
images; what can be run there is the mechanics (see ``experiments/perturbation_eval.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vit_lens.core import Positions, TokenLayout, as_batch, chunks, grid_of, position_mask, progress_bar, resolve_layers
from vit_lens.core.errors import InputError, InputTypeError

if TYPE_CHECKING:  # pragma: no cover  (annotations only: no import cycle at run time)
    from vit_lens.model import HookedViT

COMPONENTS = {
    "resid": "hook_resid_post",
    "resid_post": "hook_resid_post",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
}

__all__ = [
    "COMPONENTS",
    "RidgeProbe",
    "ridge_fit",
    "fit_ridge_probe",
    "collect_activations",
    "linear_probe_sweep",
    "probe_importance",
]


# ---------------------------------------------------------------------------------------------
# closed-form ridge
# ---------------------------------------------------------------------------------------------
def ridge_fit(
    X: Float[Tensor, "*probes n d"],
    Y: Float[Tensor, "*probes n k"],
    alpha: float = 1.0,
    *,
    fit_intercept: bool = True,
) -> Tuple[Float[Tensor, "*probes d k"], Float[Tensor, "*probes k"]]:
    """Ridge regression in closed form: ``argmin ||Y - X W - 1 b^T||^2 + alpha ||W||^2``.

    The intercept is not penalised (data are centred first, as scikit-learn's ``Ridge`` does).
    Leading axes of ``X`` (and of ``Y``, or ``Y`` broadcast from ``[n, k]``) are independent
    problems solved in one batched call. Solved in float64 by Cholesky, in the dual form
    ``W = Xc^T (Xc Xc^T + alpha I)^-1 Yc`` when ``n <= d`` and in the primal form otherwise.

    Returns:
        ``(W [*probes, d, k], b [*probes, k])`` in ``X``'s dtype.
    """
    if not 0 < alpha < float("inf"):
        raise InputError(f"alpha must be > 0 (ridge), got {alpha}")
    if X.ndim < 2:
        raise InputError(f"X must be [..., n, d], got shape {tuple(X.shape)}")
    if Y.ndim == 1:
        Y = Y[:, None]
    n, d = X.shape[-2:]
    if Y.shape[-2] != n:
        raise InputError(f"X has {n} samples but Y has {Y.shape[-2]}")
    Xd, Yd = X.double(), Y.double().expand(*X.shape[:-2], n, Y.shape[-1])
    if fit_intercept:
        x_mean, y_mean = Xd.mean(-2, keepdim=True), Yd.mean(-2, keepdim=True)
        Xd, Yd = Xd - x_mean, Yd - y_mean
    if not bool(torch.isfinite(Xd).all()):
        raise InputError("X holds NaN or inf values; ridge regression needs finite features")
    if n <= d:
        K = Xd @ Xd.transpose(-1, -2)
        K.diagonal(dim1=-2, dim2=-1).add_(alpha)
        W = Xd.transpose(-1, -2) @ _spd_solve(K, Yd)
    else:
        G = Xd.transpose(-1, -2) @ Xd
        G.diagonal(dim1=-2, dim2=-1).add_(alpha)
        W = _spd_solve(G, Xd.transpose(-1, -2) @ Yd)
    if fit_intercept:
        b = (y_mean - x_mean @ W).squeeze(-2)
    else:
        b = torch.zeros(*W.shape[:-2], W.shape[-1], dtype=W.dtype, device=W.device)
    return W.to(X.dtype), b.to(X.dtype)


def _spd_solve(A: Tensor, B: Tensor) -> Tensor:
    """``A^-1 B`` for symmetric positive definite ``A`` (batched), via Cholesky.

    (Cholesky, not ``torch.linalg.solve``: besides being the right factorisation for a ridge system,
    batched LU in some MKL builds fails on well-conditioned batches with a pivot error.)"""
    L = torch.linalg.cholesky(A)
    return torch.cholesky_solve(B, L)


@dataclass
class RidgeProbe:
    """Linear classifier probes (one per leading index), fitted by :func:`fit_ridge_probe`.

    Attributes:
        weight: [*probes, d_in, n_out]; bias: [*probes, n_out].
        classes: the class index (in the model's label space) of each output column [n_out].
        alpha: the ridge penalty used.
    """

    weight: Float[Tensor, "*probes d n_out"]
    bias: Float[Tensor, "*probes n_out"]
    classes: Int[Tensor, "n_out"]
    alpha: float

    def scores(self, X: Float[Tensor, "*probes n d"]) -> Float[Tensor, "*probes n n_out"]:
        return X.to(self.weight.dtype) @ self.weight + self.bias[..., None, :]

    def predict(self, X: Float[Tensor, "*probes n d"]) -> Int[Tensor, "*probes n"]:
        """Predicted class indices (in the model's label space)."""
        return self.classes.to(X.device)[self.scores(X).argmax(-1)]

    def target_rank(self, X: Float[Tensor, "*probes n d"], targets: Int[Tensor, "n"]) -> Int[Tensor, "*probes n"]:
        """0-based rank of each sample's target class among the probe's outputs (0 = top-1).
        A target the probe was never trained on gets rank ``n_out`` (worse than any)."""
        s = self.scores(X)
        targets = torch.as_tensor(targets, device=s.device).long()
        col = (self.classes.to(s.device)[None, :] == targets[:, None])  # [n, n_out]
        known = col.any(-1)
        t_score = (s * col.to(s.dtype)).sum(-1, keepdim=True)
        rank = (s > t_score).sum(-1)
        return torch.where(known, rank, torch.full_like(rank, s.shape[-1]))


def _int_labels(labels: Any, what: str) -> Int[Tensor, "n"]:
    """``labels`` as an int64 CPU tensor; floats, booleans and non-numbers are refused (a float label
    cast to int would silently become another class)."""
    try:
        t = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise InputTypeError(f"{what} must be integer class indices [n], got {type(labels).__name__}") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputTypeError(f"{what} must be integer class indices [n], got dtype {t.dtype}")
    return t.long().cpu()


def fit_ridge_probe(
    X: Float[Tensor, "*probes n d"],
    labels: Int[Tensor, "n"],
    alpha: float = 1.0,
    *,
    classes: Optional[Sequence[int]] = None,
) -> RidgeProbe:
    """Fit one-vs-rest ridge classifier probes on +-1 targets (the paper's probe).

    Args:
        X: features, [n, d] or batched [*probes, n, d] (e.g. one probe per position).
        labels: class index of each sample [n].
        classes: the output classes (default: the sorted distinct labels).
    """
    if not isinstance(X, Tensor) or not X.is_floating_point() or X.ndim < 2:
        got = f"{X.dtype} {tuple(X.shape)}" if isinstance(X, Tensor) else type(X).__name__
        raise InputTypeError(f"X must be a float tensor of features [n, d] or [*probes, n, d], got {got}")
    if X.shape[-2] == 0:
        raise InputError(f"X has no samples (shape {tuple(X.shape)}); a probe needs at least two labelled samples")
    labels = _int_labels(labels, "labels").to(X.device)
    if labels.ndim != 1 or labels.shape[0] != X.shape[-2]:
        raise InputError(f"labels must be [n={X.shape[-2]}], got shape {tuple(labels.shape)}")
    classes_t = torch.unique(labels) if classes is None else torch.as_tensor(list(classes), device=X.device).long()
    if len(classes_t) < 2:
        raise InputError("a probe needs at least two classes in its training labels")
    Y = (labels[:, None] == classes_t[None, :]).to(X.dtype) * 2 - 1  # +-1 targets
    W, b = ridge_fit(X, Y, alpha)
    return RidgeProbe(W, b, classes_t.cpu(), float(alpha))


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------
def _positions(model, positions: Positions, P: int) -> List[int]:
    """The selected positions of a sequence of ``P`` tokens, as indices in order."""
    return torch.nonzero(position_mask(TokenLayout.for_positions(model, P), positions)).flatten().tolist()


def _component_hook(component: str) -> str:
    if component not in COMPONENTS:
        raise InputError(f"unknown component {component!r}; choose from {sorted(COMPONENTS)}")
    return COMPONENTS[component]


def collect_activations(
    model: HookedViT,
    images: Any,
    *,
    layers: Optional[Iterable[int]] = None,
    components: Sequence[str] = ("resid",),
    positions: Union[None, str, int, Sequence[int]] = None,
    batch_size: int = 32,
    progress: bool = True,
) -> Dict[Tuple[str, int], Float[Tensor, "n n_pos d_model"]]:
    """Activations per (component, layer) at the chosen positions, on CPU in float32.

    Args:
        images: a normalised batch [n, C, H, W] (or anything ``model.preprocess`` accepts).
        layers: blocks (default all).
        components: any of ``"resid"`` (= ``resid_post``, the block output), ``"resid_pre"``,
            ``"resid_mid"``, ``"attn_out"``, ``"mlp_out"``.
        positions: None/"all", "cls", "patches", or a list of sequence positions.

    Memory: ``n x layers x components x positions x d_model`` floats -- restrict positions for big sets.
    """

    x_all = as_batch(model, images)
    layers = sorted(set(resolve_layers(layers, model)))
    hooks = {(c, l): f"blocks.{l}.{_component_hook(c)}" for c in components for l in layers}
    out: Dict[Tuple[str, int], List[Tensor]] = {k: [] for k in hooks}
    pos = None
    for s in progress_bar(chunks(len(x_all), batch_size), progress=progress, desc="activations"):
        with torch.no_grad():
            _, cache = model.run_with_cache(
                x_all[s], names_filter=list(set(hooks.values())), return_type=None, stop_at_layer=max(layers) + 1
            )
        for k, name in hooks.items():
            a = cache[name]
            if pos is None:
                pos = _positions(model, positions, a.shape[1])
            out[k].append(a[:, pos].float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# probes vs class-space projection
# ---------------------------------------------------------------------------------------------
def linear_probe_sweep(
    model: HookedViT,
    train_images: Any,
    train_labels: Int[Tensor, "n_train"],
    test_images: Any,
    test_labels: Int[Tensor, "n_test"],
    *,
    layers: Optional[Iterable[int]] = None,
    components: Sequence[str] = ("resid", "attn_out", "mlp_out"),
    positions: Union[None, str, int, Sequence[int]] = None,
    alpha: float = 1.0,
    batch_size: int = 32,
    progress: bool = True,
):
    """Train ridge probes on one image set and test them on another, per layer x component x
    position, beside the class-space projection's top-1 on the same test tokens.

    Returns:
        a pandas table, one row per (component, layer, position) with columns
        ``probe_top1`` (the probe's test accuracy), ``class_space_top1`` (projecting the same
        token through the final norm and classifier, all classes), ``class_space_top1_probe_classes``
        (the projection's argmax restricted to the classes the probe knows -- the fair comparison when
        the training set covers few classes), ``n_train``, ``n_test``, ``n_probe_classes``,
        ``test_classes_seen`` (fraction of test images whose class occurs in training).
    """
    import pandas as pd


    train_images, test_images = as_batch(model, train_images), as_batch(model, test_images)
    rows_, cols_ = grid_of(model, test_images)
    pos_list = _positions(model, positions, model.cfg.n_prefix_tokens + rows_ * cols_)
    train_labels = _int_labels(train_labels, "train_labels")
    test_labels = _int_labels(test_labels, "test_labels")
    kw: Dict[str, Any] = dict(layers=layers, components=components, positions=positions, batch_size=batch_size,
                              progress=progress)
    train = collect_activations(model, train_images, **kw)
    test = collect_activations(model, test_images, **kw)
    if len(train_labels) != next(iter(train.values())).shape[0]:
        raise InputError(f"{len(train_labels)} train labels for {next(iter(train.values())).shape[0]} train images")
    if len(test_labels) != next(iter(test.values())).shape[0]:
        raise InputError(f"{len(test_labels)} test labels for {next(iter(test.values())).shape[0]} test images")
    rows = []
    W_dtype = model.dtype
    for (comp, layer), Xtr in progress_bar(train.items(), progress=progress, desc="probes", total=len(train)):
        Xte = test[(comp, layer)]
        probe = fit_ridge_probe(Xtr.transpose(0, 1), train_labels, alpha)  # probes over positions
        pred = probe.predict(Xte.transpose(0, 1))  # [pos, n_test]
        probe_acc = (pred == test_labels[None]).float().mean(-1)
        with torch.no_grad():
            logits = model.readout.project(Xte.to(model.device, W_dtype), head=model.readout.cls_head).float().cpu()  # [n, pos, C]
        cs_acc = (logits.argmax(-1) == test_labels[:, None]).float().mean(0)
        sub = logits[..., probe.classes]
        cs_sub = (probe.classes[sub.argmax(-1)] == test_labels[:, None]).float().mean(0)
        seen = float(torch.isin(test_labels, probe.classes).float().mean())
        for i, p in enumerate(pos_list):
            rows.append(dict(component=comp, layer=layer, position=p, probe_top1=float(probe_acc[i]),
                             class_space_top1=float(cs_acc[i]), class_space_top1_probe_classes=float(cs_sub[i]),
                             n_train=len(train_labels), n_test=len(test_labels),
                             n_probe_classes=len(probe.classes), test_classes_seen=seen))
    return pd.DataFrame(rows)


def probe_importance(
    model: HookedViT,
    train_images: Any,
    train_labels: Int[Tensor, "n_train"],
    test_images: Any,
    test_targets: Int[Tensor, "n_test"],
    *,
    layers: Optional[Iterable[int]] = None,
    component: str = "resid",
    alpha: float = 1.0,
    batch_size: int = 32,
    progress: bool = True,
) -> Float[Tensor, "n_test rows cols"]:
    """The paper's "probe ranking" of image tokens, as an importance map.

    One ridge probe per layer and patch position is trained on ``train_images``; on each test
    image, the rank of its target class under each probe is summed over layers. The map is minus
    that sum (larger = the target class is better decodable from that patch's token).
    """

    x_test = as_batch(model, test_images)
    kw: Dict[str, Any] = dict(layers=layers, components=(component,), positions="patches", batch_size=batch_size,
                              progress=progress)
    train = collect_activations(model, train_images, **kw)
    test = collect_activations(model, x_test, **kw)
    train_labels = _int_labels(train_labels, "train_labels")
    test_targets = _int_labels(test_targets, "test_targets")
    total: Any = None  # one tensor per layer summed; train has at least one layer
    for key, Xtr in train.items():
        probe = fit_ridge_probe(Xtr.transpose(0, 1), train_labels, alpha)
        r = probe.target_rank(test[key].transpose(0, 1), test_targets).T  # [n_test, n_patches]
        total = r if total is None else total + r
    return (-total.float()).reshape(len(x_test), *grid_of(model, x_test)).to(model.device)
