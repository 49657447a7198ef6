"""Affinity operators: every spatial mixer as ``A·V`` with an explicit ``matrix()`` (DESIGN.md).

Every operator module registers its own builder with ``@register_affinity``; importing it here is what
puts it in the registry, so a new operator file must be added to the imports below."""
from .attention import ATTENTION_NORMS, SelfAttentionAffinity
from .base import Affinity, apply_matrix, from_tokens, merge_heads, split_heads, to_tokens, token_count
from .conv import GroupConvAffinity
from .depthwise import DepthwiseConvAffinity, conv_toeplitz
from .mixture import GATES, AffinityMixture, expand_heads
from .registry import AffinityContext, affinity_names, build_affinity, register_affinity
from .token_mlp import TokenMlpAffinity
from .key_only import KeyOnlyAttention
from .dw_attention import DepthwiseSelfAttention
from .lesa import AttentionAugmentedConv, LocallyEnhancedSelfAttention, RelativeSelfAttention2d
from .window import WindowAttention
from .neighbourhood import NeighbourhoodAttention
from .chain import AffinityChain
from .axial import AxialAttention
from .conv_attention import QuadraticEncodingAttention
from .masked import MaskedAttention, SparsePattern
from .stripes import CrossShapedWindowAttention, ShuffledWindowAttention
from .linformer import LinformerAttention
from .performer import PerformerAttention
from .reduction import SpatialReductionAttention
from .pooling import PoolingAttention
from .lambda_layer import LambdaLayer
from .dynamic_conv import DynamicConvAffinity, DynamicDepthwiseConv
from .additive import AdditiveAttention, SeparableSelfAttention
from .outlook import OutlookAttention
from .dnl import DisentangledNonLocal
from .positional import PositionalAttention, gated_positional_attention
from .rel_bias import RelativeBiasAttention
from .head_mixing import HeadMixing, LogitMixedAttention

__all__ = [
    "Affinity", "SelfAttentionAffinity", "DepthwiseConvAffinity", "GroupConvAffinity", "TokenMlpAffinity",
    "AffinityMixture", "AffinityContext", "ATTENTION_NORMS", "GATES", "apply_matrix", "split_heads",
    "merge_heads", "token_count", "conv_toeplitz", "expand_heads", "build_affinity", "register_affinity",
    "affinity_names", "KeyOnlyAttention", "LocallyEnhancedSelfAttention", "RelativeSelfAttention2d",
    "AttentionAugmentedConv", "DepthwiseSelfAttention", "to_tokens", "from_tokens", "WindowAttention",
    "NeighbourhoodAttention", "AffinityChain", "AxialAttention", "QuadraticEncodingAttention", "MaskedAttention",
    "SparsePattern", "CrossShapedWindowAttention", "ShuffledWindowAttention",
    "LinformerAttention", "PerformerAttention", "SpatialReductionAttention", "PoolingAttention", "LambdaLayer",
    "DynamicConvAffinity", "DynamicDepthwiseConv",
    "AdditiveAttention", "SeparableSelfAttention", "OutlookAttention", "DisentangledNonLocal", "PositionalAttention",
    "gated_positional_attention", "RelativeBiasAttention", "HeadMixing", "LogitMixedAttention",
]
