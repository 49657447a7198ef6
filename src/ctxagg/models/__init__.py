"""Model families, registered in timm's registry on import."""
from . import container
from .container import ContainerNet

__all__ = ["ContainerNet", "container"]
