"""isomix model families, registered with timm on import."""
from .resnet import IsoMixResNet, is_resnet_state_dict, resnet_to_isomix
from .isometric import IsoMixNet
from .multitask import MultiTaskIsoMix, TaskPath

__all__ = ['IsoMixResNet', 'IsoMixNet', 'MultiTaskIsoMix', 'TaskPath', 'is_resnet_state_dict', 'resnet_to_isomix']
