"""isomix model families, registered with timm on import."""
from .resnet import IsoMixResNet
from .isometric import IsoMixNet

__all__ = ['IsoMixResNet', 'IsoMixNet']
