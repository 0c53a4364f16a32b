"""Warm start: a timm ResNet state dict -> the `isomix_resnet*` of the same shape (`resnet_to_isomix`).

Stage i's block 0 becomes the stage's own first block; block j >= 1 becomes template j - 1 of the
stage's bank. Each executed layer takes the BN statistics of the block whose template it is scheduled
to run, so with one layer per template in the identity order the isomix model computes exactly what the
ResNet computes, and with `reuse=2` each template's statistics serve both its runs (a starting point
for fine-tuning, which a warning says).
"""
import logging
from typing import Any, Dict, Iterable, List, Sequence

import torch
import torch.nn as nn

from ..bank import SHARP_LOGIT, order_logits

__all__ = ['is_resnet_state_dict', 'resnet_to_isomix', 'checkpoint_filter_fn', 'identity_order',
           'warm_start_schedule', 'WARM_START_LOGIT', 'FINE_TUNE_RECIPE']

_logger = logging.getLogger(__name__)

_STATS = ('running_mean', 'running_var', 'num_batches_tracked')
# The logit (times the temperature) a warm start gives each soft layer's scheduled template: alpha is
# one-hot to ~1e-7 per other template, so the isomix model computes what the ResNet computes (to float32
# precision). A hard order needs none: it runs the templates as they are, exactly.
WARM_START_LOGIT = SHARP_LOGIT
# where a warm start that is not the ResNet itself (reuse=2, another order) is pointed to
FINE_TUNE_RECIPE = 'hparams/isomix_resnet50_ft_from_resnet50.yaml'


def identity_order(layers: Sequence[int]) -> List[List[int]]:
    """The ResNet's own schedule for a model of `layers` blocks per stage: one layer per template, in order."""
    return [list(range(n - 1)) for n in layers]


def is_resnet_state_dict(state_dict: Iterable[str]) -> bool:
    """True for timm/torchvision ResNet keys (`layer1.0.conv1.weight`), False for isomix keys (a state dict
    or its keys)."""
    return any(k.startswith('layer1.') for k in state_dict) and not any(k.startswith('stages.') for k in state_dict)


def _key_report(missing: List[str], unexpected: List[str]) -> str:
    def show(keys):
        return ', '.join(keys[:8]) + (f', ... ({len(keys)} in all)' if len(keys) > 8 else '')
    return f'missing keys: [{show(missing)}]; unexpected keys: [{show(unexpected)}]'


@torch.no_grad()
def resnet_to_isomix(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
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
            out[f'{name}.schedule.mixture.logits'] = order_logits(
                mixture.argmax_order(), mixture.num_templates, WARM_START_LOGIT * mixture.temperature
            ).to(mixture.logits)
    expected = set()
    for i, stage in enumerate(model.stages):
        expected |= {f'layer{i + 1}.0.{k}' for k in stage.first.state_dict()}
        expected |= {f'layer{i + 1}.{k + 1}.{name}'
                     for k in range(stage.bank.num_templates) for name in stage.bank.layout}
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
        blocks = [1 + s.bank.num_templates for s in model.stages]
        raise ValueError(f'state dict is not a timm ResNet matching {type(model).__name__} '
                         f'with {len(model.stages)} stages of {blocks} blocks: '
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
    _warn_if_not_the_resnet(model)
    return out


def _warn_if_not_the_resnet(model: nn.Module) -> None:
    """A schedule other than one layer per template in order replays ResNet blocks: say what that is."""
    scheduled = [m.argmax_order() for m in model.mixtures().values()]
    identity = [list(range(m.num_templates)) for m in model.mixtures().values()]
    if scheduled == identity:
        return
    arch = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    _logger.warning(
        f'{arch}: ResNet weights warm-start a schedule other than the ResNet\'s own '
        f'(executed layers per stage {[len(o) for o in scheduled]} over {[len(o) for o in identity]} templates): '
        f'repeated or reordered layers replay ResNet blocks with the statistics of the block they run, so this '
        f'network\'s accuracy is not the ResNet\'s. It is a starting point for fine-tuning, e.g. with '
        f'{FINE_TUNE_RECIPE}. Build it with neither reuse nor order (or reuse=1) to get the ResNet itself.')


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Pretrained weights: timm ResNet state dicts are converted, isomix ones pass through."""
    state_dict = state_dict.get('state_dict', state_dict)
    return resnet_to_isomix(state_dict, model) if is_resnet_state_dict(state_dict) else state_dict


def warm_start_schedule(weight_keys: Sequence[str], kwargs: Dict[str, Any]) -> None:
    """Given timm ResNet weights and neither `reuse` nor `order`, build the ResNet itself (hard identity order)."""
    if is_resnet_state_dict(weight_keys) and kwargs.get('reuse') is None and kwargs.get('order') is None:
        kwargs['order'] = identity_order(kwargs.get('layers', (3, 4, 6, 3)))


