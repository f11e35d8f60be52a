"""Small modules that make up a :class:`~vit_lens.HookedViT`."""

from vit_lens.components.attention import Attention
from vit_lens.components.block import TransformerBlock
from vit_lens.components.embed import PatchEmbed, PosEmbed
from vit_lens.components.head import Unembed
from vit_lens.components.layer_norm import LayerNorm
from vit_lens.components.mlp import MLP
from vit_lens.components.readout import Readout

__all__ = ["Attention", "TransformerBlock", "PatchEmbed", "PosEmbed", "Unembed", "LayerNorm", "MLP", "Readout"]
