"""ctxagg: spatial mixers as affinity matrices (Container, LinGlos, LESA, dynamic-convolution ViTs).

Importing ``ctxagg`` registers every model in timm: ``timm.create_model("container_light")``.
"""
from . import affinity, blocks, layers, models
from .affinity import build_affinity

__version__ = "0.1.0"
__all__ = ["affinity", "blocks", "layers", "models", "build_affinity", "__version__"]
