"""Warm start: a timm ResNet state dict -> the isomix ResNet of the same shape.

Stage i's block 0 becomes the stage's own first block; block j >= 1 becomes template j - 1 of the
stage's bank. Each executed layer takes the BN statistics of the block whose template it is
scheduled to run (its argmax), so with `reuse=1` and the cyclic order the isomix model computes
exactly what the ResNet computes, and with `reuse=2` each template's statistics serve both its runs.
"""
from typing import Dict, List

import torch

from .models.resnet import IsoMixResNet

__all__ = ['is_resnet_state_dict', 'resnet_to_isomix']

_STATS = ('running_mean', 'running_var', 'num_batches_tracked')
# The logit a warm start gives each soft layer's scheduled template: alpha is one-hot to ~1e-7 per other
# template, so the isomix model computes what the ResNet computes (to float32 precision).
WARM_START_LOGIT = 16.0


def is_resnet_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True for timm/torchvision ResNet keys (`layer1.0.conv1.weight`), False for isomix keys."""
    return any(k.startswith('layer1.') for k in state_dict) and not any(k.startswith('stages.') for k in state_dict)


def _key_report(missing: List[str], unexpected: List[str]) -> str:
    def show(keys):
        return ', '.join(keys[:8]) + (f', ... ({len(keys)} in all)' if len(keys) > 8 else '')
    return f'missing keys: [{show(missing)}]; unexpected keys: [{show(unexpected)}]'


@torch.no_grad()
def resnet_to_isomix(state_dict: Dict[str, torch.Tensor], model: IsoMixResNet) -> Dict[str, torch.Tensor]:
    """Map a timm ResNet state dict onto `model`'s keys.

    Each soft mixture keeps its scheduled order (the argmax of the model's logits, the cyclic order
    for a fresh model) and gets sharp logits (WARM_START_LOGIT) on it; hard orders need none.

    Raises ValueError naming the missing and unexpected keys (or mismatched shapes) when the
    state dict is not of the ResNet this model was built from.
    """
    target = model.state_dict()
    out = {}
    for name, mixture in model.mixtures().items():
        if not mixture.is_hard:
            logits = torch.zeros_like(mixture.logits)
            logits[torch.arange(mixture.num_layers), torch.tensor(mixture.argmax_order())] = WARM_START_LOGIT
            out[f'{name}.schedule.mixture.logits'] = logits
    expected = set()
    for i, stage in enumerate(model.stages):
        expected |= {f'layer{i + 1}.0.{k}' for k in stage.first.state_dict()}
        expected |= {f'layer{i + 1}.{k + 1}.{name}' for k in range(stage.bank.num_templates) for name in stage.bank.layout}
        norms = {name.split('.')[0] for name in stage.bank.layout if name.startswith('bn')}
        expected |= {f'layer{i + 1}.{k + 1}.{bn}.{s}' for k in range(stage.bank.num_templates)
                     for bn in norms for s in _STATS}
    # stem and head pass through as given: timm's loader adapts or drops the classifier afterwards
    classifier = model.get_classifier(name_only=True)
    expected |= {k for k in target if not k.startswith(('stages.', classifier + '.'))}
    given = {k for k in state_dict if k.startswith('layer') or not k.startswith(classifier + '.')}
    missing = sorted(k for k in expected - given if not k.endswith('num_batches_tracked'))
    unexpected = sorted(k for k in given - expected if not k.endswith('num_batches_tracked'))
    if missing or unexpected:
        raise ValueError(f'state dict is not a timm ResNet matching {type(model).__name__} '
                         f'with {len(model.stages)} stages of {[1 + s.bank.num_templates for s in model.stages]} blocks: '
                         + _key_report(missing, unexpected))

    out.update({k: v for k, v in state_dict.items() if not k.startswith('layer')})
    for i, stage in enumerate(model.stages):
        src, dst = f'layer{i + 1}', f'stages.{i}'
        for k in stage.first.state_dict():
            out[f'{dst}.first.{k}'] = state_dict[f'{src}.0.{k}']
        rows = {'weight': [], 'affine': []}
        for t in range(stage.bank.num_templates):
            parts = {'weight': [], 'affine': []}
            for name, (group, _, shape) in stage.bank.layout.items():
                value = state_dict[f'{src}.{t + 1}.{name}']
                if tuple(value.shape) != shape:
                    raise ValueError(f'{src}.{t + 1}.{name} has shape {tuple(value.shape)}, '
                                     f'but the bank of {dst} expects {shape}')
                parts[group].append(value.reshape(-1))
            for group in rows:
                rows[group].append(torch.cat(parts[group]))
        out[f'{dst}.bank.weight'] = torch.stack(rows['weight'])
        out[f'{dst}.bank.affine'] = torch.stack(rows['affine'])
        templates = stage.schedule.mixture.argmax_order()
        for l, layer in enumerate(stage.schedule.layers):
            for k in layer.state_dict():  # bn1.running_mean, ...
                out[f'{dst}.schedule.layers.{l}.{k}'] = state_dict.get(
                    f'{src}.{templates[l] + 1}.{k}', target[f'{dst}.schedule.layers.{l}.{k}'])
    return out
