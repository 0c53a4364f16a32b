"""timm-isomix: template banks, mixtures and block reuse for timm models.

Importing the package registers the `isomix_*` models with timm, so that
`timm.create_model('isomix_resnet50')` and `timm.list_models('isomix_*')` work.
"""
from .bank import INIT_LOGIT, Mixture, Schedule, TemplateBank, cyclic_order
from .blocks import BasicLayer, BottleneckLayer
from .convert import is_resnet_state_dict, resnet_to_isomix
from .models import IsoMixNet, IsoMixResNet

__all__ = [
    'INIT_LOGIT', 'Mixture', 'Schedule', 'TemplateBank', 'cyclic_order', 'BasicLayer', 'BottleneckLayer',
    'is_resnet_state_dict', 'resnet_to_isomix', 'IsoMixNet', 'IsoMixResNet',
]
__version__ = '0.1.0'
