"""Measurement: parameters, MACs, activations, throughput and memory."""
from .activations import count_activations
from .complexity import count_gmacs, count_params
from .memory import IntermediateRecorder, largest_intermediate

__all__ = ["count_activations", "count_params", "count_gmacs", "IntermediateRecorder", "largest_intermediate"]
