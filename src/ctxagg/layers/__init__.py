"""Layers blocks need besides affinities (positional encodings, patch embeddings, norms)."""
from .patch_embed import ConvPatchEmbed

__all__ = ["ConvPatchEmbed"]
