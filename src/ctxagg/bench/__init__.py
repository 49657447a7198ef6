"""Measurement: parameters, MACs, activations, throughput and memory."""
from .complexity import count_gmacs, count_params
from .memory import IntermediateRecorder, largest_intermediate

__all__ = ["count_params", "count_gmacs", "IntermediateRecorder", "largest_intermediate"]
