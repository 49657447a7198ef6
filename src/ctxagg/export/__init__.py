"""Deployment: re-parameterisation, optimised inference and export (ONNX / TorchScript / torch.export)."""
from .formats import FORMATS, export_model, verify_onnx
from .optimize import DeployedModel, optimize, reparameterize
from .run import run_export

__all__ = ["optimize", "reparameterize", "DeployedModel", "export_model", "verify_onnx", "FORMATS", "run_export"]
