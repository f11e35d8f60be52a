"""The one table of supported model families, and the README's supported-models table.

Every family below has a parity test (``tests/test_zoo.py``) that converts a small random
instance of its ``example`` architecture and compares logits and every block output with timm
(max abs diff <= 1e-4, float32), with and without each weight-processing option; and a test that
every listed architecture is accepted by the converter at its real width, heads and image size.

Print the README table with ``python -m vit_lens.loading.registry --markdown``.
"""

from __future__ import annotations

import argparse
import fnmatch
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple
from vit_lens.core.errors import InputError


@dataclass(frozen=True)
class ModelFamily:
    """One row of the registry.

    Attributes:
        key: short identifier (``supported_models(family=key)``).
        title: human-readable family name.
        names: the timm architecture names it covers (exact names; a name with a ``.tag`` means
            only those pretrained weights, e.g. the DINO tags of plain ViTs).
        features: what the converter reproduces for it.
        class_space: the "final LayerNorm" and classifier of the class-space projection
            (what :meth:`HookedViT.project_to_classes` applies).
        example: the architecture the parity test instantiates.
        test_kwargs: timm keyword arguments that make the example small for the parity test
            (the family's own features are kept).
        not_foldable: weight-processing options refused for this family (and why, in the docs).
    """

    key: str
    title: str
    names: Tuple[str, ...]
    features: str
    class_space: str
    example: str
    test_kwargs: Dict[str, object] = field(default_factory=dict)
    not_foldable: Tuple[str, ...] = ()


_SMALL: Dict[str, object] = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)

FAMILIES: Tuple[ModelFamily, ...] = (
    ModelFamily(
        key="vit",
        title="ViT (original, AugReg, MAE, FlexiViT)",
        names=(
            "vit_tiny_patch16_224", "vit_tiny_patch16_384", "vit_small_patch8_224", "vit_small_patch16_224",
            "vit_small_patch16_384", "vit_small_patch32_224", "vit_small_patch32_384", "vit_small_patch16_36x1_224",
            "vit_base_patch8_224", "vit_base_patch16_224", "vit_base_patch16_384", "vit_base_patch32_224",
            "vit_base_patch32_384", "vit_base_patch16_plus_240", "vit_base_patch32_plus_256", "vit_large_patch14_224",
            "vit_large_patch16_224", "vit_large_patch16_384", "vit_large_patch32_224", "vit_large_patch32_384",
            "vit_huge_patch14_224", "vit_giant_patch14_224", "vit_gigantic_patch14_224", "flexivit_small",
            "flexivit_base", "flexivit_large",
        ),
        features="[CLS] token, learned position embedding; LayerScale (`*_plus_*`, `36x1`), no position embedding "
        "on [CLS] (FlexiViT)",
        class_space="`ln_final` on the [CLS] token, then `W_U`, `b_U`",
        example="vit_tiny_patch16_224",
        test_kwargs=_SMALL,
    ),
    ModelFamily(
        key="dino",
        title="DINO (headless ViT, `num_classes=0`)",
        names=(
            "vit_small_patch16_224.dino", "vit_base_patch16_224.dino", "vit_small_patch8_224.dino",
            "vit_base_patch8_224.dino",
        ),
        features="no classifier: the output is the pooled feature",
        class_space="none until `set_class_directions(W)`; then `ln_final` on [CLS], then `W`",
        example="vit_small_patch16_224",
        test_kwargs=dict(_SMALL, num_classes=0),
        not_foldable=("fold_ln", "center_unembed"),
    ),
    ModelFamily(
        key="miil",
        title="ViT-B/16 MIIL ImageNet-21K-P (11221 classes)",
        names=("vit_base_patch16_224_miil",),
        features="any number of classes (11221), no qkv bias",
        class_space="`ln_final` on the [CLS] token, then `W_U`, `b_U`",
        example="vit_base_patch16_224_miil",
        test_kwargs=_SMALL,
    ),
    ModelFamily(
        key="deit",
        title="DeiT",
        names=("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "deit_base_patch16_384"),
        features="[CLS] token, learned position embedding",
        class_space="`ln_final` on the [CLS] token, then `W_U`, `b_U`",
        example="deit_tiny_patch16_224",
        test_kwargs=_SMALL,
    ),
    ModelFamily(
        key="deit_distilled",
        title="DeiT distilled",
        names=(
            "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224",
            "deit_base_distilled_patch16_384",
        ),
        features="[CLS] + distillation token, two heads (`W_U`, `W_U_dist`); logits = mean of both heads",
        class_space="`ln_final`, then the mean of both heads (`head=\"cls\"`/`\"dist\"` selects one)",
        example="deit_tiny_distilled_patch16_224",
        test_kwargs=_SMALL,
    ),
    ModelFamily(
        key="deit3",
        title="DeiT-III",
        names=(
            "deit3_small_patch16_224", "deit3_small_patch16_384", "deit3_medium_patch16_224", "deit3_base_patch16_224",
            "deit3_base_patch16_384", "deit3_large_patch16_224", "deit3_large_patch16_384", "deit3_huge_patch14_224",
        ),
        features="no position embedding on [CLS] (`no_embed_class`), LayerScale (folded into `W_O`, `W_out`)",
        class_space="`ln_final` on the [CLS] token, then `W_U`, `b_U`",
        example="deit3_small_patch16_224",
        test_kwargs=_SMALL,
    ),
    ModelFamily(
        key="clip",
        title="CLIP image towers",
        names=(
            "vit_xsmall_patch16_clip_224", "vit_medium_patch16_clip_224", "vit_medium_patch32_clip_224",
            "vit_betwixt_patch32_clip_224", "vit_base_patch16_clip_224", "vit_base_patch16_clip_384",
            "vit_base_patch16_plus_clip_240", "vit_base_patch32_clip_224", "vit_base_patch32_clip_256",
            "vit_base_patch32_clip_384", "vit_base_patch32_clip_448", "vit_large_patch14_clip_224",
            "vit_large_patch14_clip_336", "vit_huge_patch14_clip_224", "vit_huge_patch14_clip_336",
            "vit_huge_patch14_clip_378", "vit_giant_patch14_clip_224", "vit_gigantic_patch14_clip_224",
            "vit_gigantic_patch14_clip_378",
        ),
        features="`norm_pre` (as `ln_pre`), no patch bias; head = projection into the image-text space "
        "(`.openai`, `.laion2b`, ... tags) or an ImageNet classifier (`*_ft_*` tags)",
        class_space="`ln_final` on [CLS], then the projection; class directions from text embeddings via "
        "`set_class_directions(W_text, space=\"head\")` (`W_U = W_proj @ W_text`)",
        example="vit_base_patch32_clip_224",
        test_kwargs=dict(_SMALL, num_classes=24),
    ),
    ModelFamily(
        key="clip_quickgelu",
        title="CLIP image towers, QuickGELU",
        names=(
            "vit_base_patch32_clip_quickgelu_224", "vit_base_patch16_clip_quickgelu_224",
            "vit_large_patch14_clip_quickgelu_224", "vit_large_patch14_clip_quickgelu_336",
            "vit_huge_patch14_clip_quickgelu_224", "vit_huge_patch14_clip_quickgelu_378",
            "vit_gigantic_patch14_clip_quickgelu_224",
        ),
        features="as CLIP, with QuickGELU (`x * sigmoid(1.702 x)`)",
        class_space="as CLIP",
        example="vit_base_patch16_clip_quickgelu_224",
        test_kwargs=_SMALL,
    ),
    ModelFamily(
        key="gap",
        title="Global-average-pooled ViT, no class token",
        names=(
            "vit_medium_patch16_gap_240", "vit_medium_patch16_gap_256", "vit_medium_patch16_gap_384",
            "vit_betwixt_patch16_gap_256", "vit_base_patch16_gap_224", "vit_huge_patch14_gap_224",
            "vit_huge_patch16_gap_448", "vit_giant_patch16_gap_224",
        ),
        features="no [CLS]; `ln_final` on every token, then the mean of the patch tokens; LayerScale and no qkv "
        "bias (medium, betwixt)",
        class_space="`ln_final` on each token, then `W_U`; logits = mean over patches of the per-token projection",
        example="vit_medium_patch16_gap_256",
        test_kwargs=_SMALL,
    ),
    ModelFamily(
        key="reg_gap",
        title="Register tokens + global average pooling",
        names=(
            "vit_wee_patch16_reg1_gap_256", "vit_little_patch16_reg1_gap_256", "vit_little_patch16_reg4_gap_256",
            "vit_medium_patch16_reg1_gap_256", "vit_medium_patch16_reg4_gap_256", "vit_mediumd_patch16_reg4_gap_256",
            "vit_mediumd_patch16_reg4_gap_384", "vit_betwixt_patch16_reg1_gap_256", "vit_betwixt_patch16_reg4_gap_256",
            "vit_betwixt_patch16_reg4_gap_384", "vit_base_patch16_reg4_gap_256", "vit_so150m_patch16_reg4_gap_256",
            "vit_so150m_patch16_reg4_gap_384", "vit_so150m2_patch16_reg1_gap_256", "vit_so150m2_patch16_reg1_gap_384",
            "vit_so150m2_patch16_reg1_gap_448",
        ),
        features="register tokens (most without position embedding: `no_embed_class`), mean of the patch "
        "tokens, LayerScale (most)",
        class_space="`fc_norm` on the pooled (mean) vector, then `W_U` (`so150m`: `ln_final` on each token, "
        "then the mean); registers are not pooled",
        example="vit_medium_patch16_reg4_gap_256",
        test_kwargs=_SMALL,
    ),
    ModelFamily(
        key="siglip_gap",
        title="SigLIP image towers, average-pooled (headless)",
        names=(
            "vit_base_patch16_siglip_gap_224", "vit_base_patch16_siglip_gap_256", "vit_base_patch16_siglip_gap_384",
            "vit_base_patch16_siglip_gap_512", "vit_base_patch32_siglip_gap_256", "vit_large_patch16_siglip_gap_256",
            "vit_large_patch16_siglip_gap_384", "vit_large_patch16_siglip_gap_512", "vit_so400m_patch14_siglip_gap_224",
            "vit_so400m_patch14_siglip_gap_378", "vit_so400m_patch14_siglip_gap_448",
            "vit_so400m_patch14_siglip_gap_896", "vit_so400m_patch16_siglip_gap_256",
            "vit_so400m_patch16_siglip_gap_384", "vit_so400m_patch16_siglip_gap_512",
            "vit_giantopt_patch16_siglip_gap_256", "vit_giantopt_patch16_siglip_gap_384",
        ),
        features="no [CLS], `ln_final` then mean of the tokens, GELU or GELU-tanh, no classifier",
        class_space="none until `set_class_directions(W)`; then `ln_final` on each token, then `W`",
        example="vit_base_patch32_siglip_gap_256",
        test_kwargs=_SMALL,
        not_foldable=("fold_ln", "center_unembed"),
    ),
    ModelFamily(
        key="rpn",
        title="ResPostBlock ViT, average-pooled (`vit_base_patch16_rpn_224`, the seed paper's GAP model)",
        names=("vit_base_patch16_rpn_224",),
        features="post-norm blocks (`ResPostBlock`: `x + norm(attn(x))`), no [CLS], mean of the tokens, `fc_norm`",
        class_space="`fc_norm` on the pooled (mean) vector, then `W_U`",
        example="vit_base_patch16_rpn_224",
        test_kwargs=_SMALL,
        not_foldable=("fold_ln", "center_writing_weights"),
    ),
    ModelFamily(
        key="eva01",
        title="EVA-01 (plain ViT-L, average-pooled; not EVA-02)",
        names=("eva_large_patch14_196", "eva_large_patch14_336"),
        features="a [CLS] token that is not pooled: mean of the patch tokens, `fc_norm`",
        class_space="`fc_norm` on the pooled (mean) vector, then `W_U`",
        example="eva_large_patch14_196",
        test_kwargs=_SMALL,
    ),
    ModelFamily(
        key="dinov2",
        title="DINOv2 (headless)",
        names=("vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_large_patch14_dinov2"),
        features="LayerScale, 518 px (other sizes with timm's `dynamic_img_size=True`), no classifier",
        class_space="none until `set_class_directions(W)`; then `ln_final` on [CLS], then `W`",
        example="vit_small_patch14_dinov2",
        test_kwargs=_SMALL,
        not_foldable=("fold_ln", "center_unembed"),
    ),
    ModelFamily(
        key="dinov2_reg",
        title="DINOv2 with registers (headless)",
        names=("vit_small_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2", "vit_large_patch14_reg4_dinov2"),
        features="4 register tokens, no position embedding on prefix tokens, LayerScale, no classifier",
        class_space="none until `set_class_directions(W)`; then `ln_final` on [CLS], then `W`",
        example="vit_small_patch14_reg4_dinov2",
        test_kwargs=_SMALL,
        not_foldable=("fold_ln", "center_unembed"),
    ),
)

#: features refused up front with UnsupportedModelError (the converter's checks), with timm name
#: patterns whose every match is refused (tested), for the README
UNSUPPORTED: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("rotary position embeddings (EVA-02, RoPE ViTs)", ("eva02_*", "vit_*_rope_*")),
    ("relative position bias (BEiT)", ("beit_*", "beitv2_*")),
    ("attention-pool heads (`global_pool='map'`)", ("vit_*_siglip_224", "vit_*_siglip_256", "vit_*_siglip_384",
                                                   "vit_*_siglip_512", "vit_*_map_*")),
    ("parallel attention/MLP blocks", ("vit_*_18x2_*", "vit_*_xp_*", "vit_pwee_*")),
    ("differential attention", ("vit_dwee_*", "vit_dlittle_*", "vit_dpwee_*")),
    ("QK / attention-output normalisation", ("beit3_*",)),
    ("SwiGLU / GLU MLPs", ("vit_giant_patch14_dinov2", "vit_giant_patch14_reg4_dinov2", "vit_giant_*_tipsv2")),
    ("hybrid CNN stems, normalised patch embeddings", ("vit_*_r50_*", "aimv2_*")),
)


def _arch(name: str) -> str:
    return name.split(".", 1)[0]


def family_of(name: str) -> Optional[ModelFamily]:
    """The registry row covering a timm name (``arch`` or ``arch.tag``), or None.

    A row listing ``arch.tag`` names (e.g. DINO) matches only those tags; a row listing an
    architecture matches it with any tag.
    """
    for fam in FAMILIES:
        if name in fam.names:
            return fam
    arch = _arch(name)
    for fam in FAMILIES:
        if arch in fam.names:
            return fam
    return None


def supported_models(family: Optional[str] = None, *, pattern: Optional[str] = None) -> List[str]:
    """The timm names HookedViT supports (each family has a parity test against timm).

    Args:
        family: only this family (a key of :data:`FAMILIES`, e.g. ``"clip"``, ``"deit_distilled"``).
        pattern: only names matching this shell pattern (e.g. ``"vit_base_*"``).

    Returns:
        sorted timm names: architectures (any pretrained tag) and, for tag-defined families such
        as DINO, ``arch.tag`` names.

    Example::

        >>> import vit_lens
        >>> vit_lens.supported_models("deit_distilled")[:2]
        ['deit_base_distilled_patch16_224', 'deit_base_distilled_patch16_384']
    """
    keys = [f.key for f in FAMILIES]
    if family is not None and family not in keys:
        raise InputError(f"unknown family {family!r}; families: {keys}")
    names = {n for f in FAMILIES if family in (None, f.key) for n in f.names}
    if pattern is not None:
        names = {n for n in names if fnmatch.fnmatch(n, pattern)}
    return sorted(names)


#: one table row: (source, family, names, what is reproduced, class-space projection), markdown cells
TableRow = Tuple[str, str, str, str, str]

#: the source modules whose ``table_rows()`` follow timm's rows in the README table (skipped when not importable)
TABLE_SOURCES: Tuple[str, ...] = ("vit_lens.loading.sources.hf", "vit_lens.loading.sources.open_clip")


def timm_table_rows() -> List[TableRow]:
    """The timm families (:data:`FAMILIES`) as table rows."""
    return [("timm", f.title, ", ".join(f"`{n}`" for n in f.names), f.features, f.class_space) for f in FAMILIES]


def table_rows() -> List[TableRow]:
    """Every source's rows: timm's, then each module of :data:`TABLE_SOURCES` that is importable and
    defines ``table_rows() -> list[(source, family, names, what is reproduced, class-space projection)]``."""
    import importlib

    rows = timm_table_rows()
    for module in TABLE_SOURCES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        fn = getattr(mod, "table_rows", None)
        if callable(fn):
            rows.extend(tuple(r) for r in fn())  # type: ignore[misc]
    return rows


def markdown_table() -> str:
    """The README's supported-models section body (generated; do not edit the README by hand)."""
    lines = [
        "| Source | Family | Names | What is reproduced | Class-space projection (final norm, then classifier) |",
        "|---|---|---|---|---|",
    ]
    for source, family, names, features, class_space in table_rows():
        lines.append(f"| {source} | {family} | {names} | {features} | {class_space} |")
    lines += [
        "",
        "Each timm family's parity test converts a small random instance and compares logits and every block "
        "output with timm (max abs diff <= 1e-4, float32), with and without each weight-processing "
        "option; every name above is checked to convert at its real size. Weight processing refused: "
        + "; ".join(f"{f.key}: {', '.join(f'`{o}`' for o in f.not_foldable)}" for f in FAMILIES if f.not_foldable)
        + " (headless models: fold the final norm after `set_class_directions`; post-norm blocks write "
        "normalised outputs into the residual stream, which cannot be folded or centred).",
        "",
        "Refused up front with `UnsupportedModelError` naming the feature:",
        "",
    ]
    for feature, patterns in UNSUPPORTED:
        lines.append(f"- {feature}: {', '.join(f'`{p}`' for p in patterns)}")
    lines.append("- and `qk_norm=True`, RMSNorm, `global_pool='max'`, models without a learned position embedding")
    lines += ["", "List them in Python with `vit_lens.supported_models()` (or `supported_models(\"clip\")`)."]
    for module in TABLE_SOURCES:  # each other source's notes (parity, refusals), when it has them
        try:
            import importlib

            notes = getattr(importlib.import_module(module), "table_notes", None)
        except ImportError:
            continue
        if callable(notes):
            lines += ["", notes()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vit_lens.loading.registry", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the README's supported-models table")
    parser.add_argument("--family", default=None, help="list only this family's names")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table())
    else:
        print("\n".join(supported_models(args.family)))


if __name__ == "__main__":
    main()
