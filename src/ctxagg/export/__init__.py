"""Deployment: re-parameterisation, optimised inference (bf16, int8) and export (ONNX / TorchScript / torch.export)."""
from .formats import FORMATS, export_model, verify_onnx
from .optimize import DeployedModel, optimize, reparameterize
from .quantize import INT8_MODES, quantize_int8, top1_agreement
from .run import run_export

__all__ = ["optimize", "reparameterize", "DeployedModel", "export_model", "verify_onnx", "FORMATS", "run_export",
           "quantize_int8", "top1_agreement", "INT8_MODES"]
