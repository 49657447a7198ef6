"""Layers blocks need besides affinities (positional encodings, downsampling, folds)."""
from .patch_embed import ConvDownsample
from .pos_embed import AbsolutePosEmbed, ConvPosEnc
from .rep_cpe import CPE_MODES, RepConditionalPosEnc

__all__ = ["ConvDownsample", "AbsolutePosEmbed", "ConvPosEnc", "CPE_MODES", "RepConditionalPosEnc"]
