"""timm-isomix: template banks, mixtures and block reuse for timm models.

Importing the package registers the `isomix_*` models with timm, so that
`timm.create_model('isomix_resnet50')` and `timm.list_models('isomix_*')` work.

Layers, each importing only from those above it in this list:
    bank, blocks   the method: template banks, mixtures, executed layers
    models         the timm model families and the multi-task model
    train          training loop, validation, checkpoints (train.py / validate.py)
    tasks          multi-task training, transfer, domain adaptation
    hub, tools     publishing; benchmark, model table
"""
from .bank import INIT_LOGIT, Mixture, Schedule, TemplateBank, cyclic_order, order_logits
from .blocks import BasicLayer, BottleneckLayer
from .models import IsoMixNet, IsoMixResNet, MultiTaskIsoMix, is_resnet_state_dict, resnet_to_isomix

__all__ = [
    'INIT_LOGIT', 'Mixture', 'Schedule', 'TemplateBank', 'cyclic_order', 'order_logits', 'BasicLayer',
    'BottleneckLayer', 'is_resnet_state_dict', 'resnet_to_isomix', 'IsoMixNet', 'IsoMixResNet', 'MultiTaskIsoMix',
]
__version__ = '0.1.0'
