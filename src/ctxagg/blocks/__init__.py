"""Blocks: an affinity plus projections, channel MLP, norms and residuals."""
from .aggregation import AggregationBlock, TokenAggregationBlock

__all__ = ["AggregationBlock", "TokenAggregationBlock"]
