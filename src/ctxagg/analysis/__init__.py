"""Analysis of trained and untrained models: affinity maps and their numbers (`ctxagg inspect`), LESA's
unary/binary shares. Plotting lives in :mod:`ctxagg.analysis.inspect`; the modules re-exported here do none."""
from .affinity_maps import (AffinityCall, affinity_rows, capture_affinity_calls, conv_rows, diagonal_share,
                            layer_statistics, locality_score, mixture_weights, uniform_locality)
from .lesa import diagonal_shares, fusion_weight_shares, unary_ablation

__all__ = ["AffinityCall", "affinity_rows", "capture_affinity_calls", "conv_rows", "diagonal_share",
           "layer_statistics", "locality_score", "mixture_weights", "uniform_locality", "diagonal_shares",
           "fusion_weight_shares", "unary_ablation"]
