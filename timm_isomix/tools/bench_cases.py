"""The benchmark's cases: which models are timed side by side, and the plain references they are compared with."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch.nn as nn

import timm
from timm.layers import create_classifier
from timm.models.resnet import BasicBlock, ResNet

from ..bank import cyclic_order
from ..models import IsoMixNet, IsoMixResNet

__all__ = ['Case', 'make_cases', 'plain_isometric', 'same_depth_resnet', 'build_model']


@dataclass
class Case:
    """One model to time: `model` is a timm model name or 'plain_isometric:<isomix_iso name>'."""
    name: str
    model: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    hard: bool = False              # replace the mixtures by their cyclic hard order (no mixing)
    reference: Optional[str] = None  # name of the case this one is compared with
    role: str = 'reference'         # soft1, hard1, reuse2, iso, iso_hard: which target applies
    peer: Optional[str] = None      # a second reference of the same FLOPs (reported, no target)


def make_cases(suite: str = 'resnet50') -> List[Case]:
    """The cases of a suite: 'resnet50' (the cases README reports) or 'tiny' (small models, for tests)."""
    if suite == 'resnet50':
        resnet, isomix, iso = 'resnet50', 'isomix_resnet50', 'isomix_iso_256_16_p14'
    elif suite == 'tiny':
        resnet, isomix, iso = 'resnet18', 'isomix_resnet18', 'isomix_iso_64_8_p2'
    else:
        raise ValueError(f"unknown suite {suite!r}; expected 'resnet50' or 'tiny'")
    return [
        Case(resnet, resnet),
        Case(f'{isomix} reuse=1 soft', isomix, dict(reuse=1), reference=resnet, role='soft1'),
        Case(f'{isomix} reuse=1 hard', isomix, dict(reuse=1), hard=True, reference=resnet, role='hard1'),
        Case(f'{resnet} at reuse=2 depth', f'same_depth_resnet:{isomix}', dict(reuse=2)),
        Case(f'{isomix} reuse=2 soft', isomix, dict(reuse=2), reference=resnet, role='reuse2',
             peer=f'{resnet} at reuse=2 depth'),
        Case(f'plain {iso}', f'plain_isometric:{iso}'),
        Case(f'{iso} soft', iso, reference=f'plain {iso}', role='iso'),
        Case(f'{iso} hard', iso, hard=True, reference=f'plain {iso}', role='iso_hard'),
    ]


def plain_isometric(iso: IsoMixNet) -> nn.Module:
    """The same network as `iso` without a bank: each executed layer is timm's BasicBlock with its
    own parameters. Same stem, depth, width and head, hence the same FLOPs; the reference for what
    the bank and the mixing cost."""
    width, depth, conv = iso.num_features, iso.schedule.num_layers, iso.stem.conv
    stem = nn.Sequential(
        nn.Conv2d(iso.in_chans, width, conv.kernel_size, conv.stride, bias=False),
        nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    blocks = [BasicBlock(width, width) for _ in range(depth)]
    pool, head = create_classifier(width, iso.num_classes, pool_type='avg')
    return nn.Sequential(stem, *blocks, pool, head)


def same_depth_resnet(model: IsoMixResNet) -> ResNet:
    """timm's ResNet with as many blocks per stage as `model` runs (its first block plus its schedule):
    the same FLOPs, but every block with parameters of its own and no mixing."""
    layers = [1 + stage.schedule.num_layers for stage in model.stages]
    block = type(model.stages[0].first)  # timm's BasicBlock or Bottleneck
    return ResNet(block, layers, num_classes=model.num_classes, in_chans=model.in_chans)


def build_model(case: Case, num_classes: int) -> nn.Module:
    if case.model.startswith('plain_isometric:'):
        return plain_isometric(timm.create_model(case.model.split(':', 1)[1], num_classes=num_classes))
    if case.model.startswith('same_depth_resnet:'):
        isomix = timm.create_model(case.model.split(':', 1)[1], num_classes=num_classes, **case.kwargs)
        return same_depth_resnet(isomix)
    model = timm.create_model(case.model, num_classes=num_classes, **case.kwargs)
    if case.hard:
        model.set_schedule(order=[cyclic_order(m.num_layers, m.num_templates) for m in model.mixtures().values()])
    return model
