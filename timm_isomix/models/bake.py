"""Bake one task of a `MultiTaskIsoMix` into a plain network that needs only timm and torch.

The task's path in eval mode is fixed: each executed layer's mixture of templates becomes that layer's own weights
(computed by the task's `Mixture`, so they are the ones the path runs), its scale and shift the patch's or the mixed
ones, its statistics the task's. A staged backbone bakes into timm's `ResNet` (`timm.models.resnet.ResNet`: stage i
holds the unbanked first block and then one block per executed layer, so a schedule of one layer per template in
order is a state dict of the timm ResNet itself, e.g. `resnet50`'s); an isometric one into an `nn.Sequential` of
the patch stem (`Conv2d`, `BatchNorm2d`, act), one timm `BasicBlock` per executed layer, timm's pooling and a
`Linear` head. The baked network is in eval mode, carries the task's data config as `pretrained_cfg` (so
`timm.data.resolve_model_data_config` reads it), and exports with `torch.onnx.export`.
"""
from collections import OrderedDict
from typing import Dict, List

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ['bake_task', 'layer_params']


@torch.no_grad()
def layer_params(model, path) -> List[List[Dict[str, torch.Tensor]]]:
    """Per schedule, per executed layer: its parameters by timm name (mixed kernels; patch or mixed scale, shift)."""
    patches = model._patch_rows(path) if path.has_patch else None
    out = []
    for i, schedule in enumerate(path.schedules):
        bank = model._bank_for(path, i)
        weight, affine = schedule.mixture(bank.weight, bank.affine)
        if patches is not None:
            affine = patches[i]
        out.append(bank.unflatten_rows(weight, affine, schedule.num_layers))
    return out


def _stem_state(model, path, prefix: str) -> Dict[str, torch.Tensor]:
    conv, bn, _, _ = model._stem_parts(path)
    scale, shift = (path.patch_stem[0], path.patch_stem[1]) if path.patch_stem is not None else (bn.weight, bn.bias)
    state = {f'{prefix}conv.weight' if prefix else 'conv1.weight': conv.weight}
    bn_prefix = f'{prefix}bn.' if prefix else 'bn1.'
    state.update({bn_prefix + 'weight': scale, bn_prefix + 'bias': shift})
    state.update({bn_prefix + k: v for k, v in path.stem_stats.state_dict().items()})
    return state


def _layers_state(model, path, prefix_of) -> Dict[str, torch.Tensor]:
    """Every executed layer's parameters and statistics under `prefix_of(schedule, layer)`."""
    state = {}
    for i, (schedule, rows) in enumerate(zip(path.schedules, layer_params(model, path))):
        for l, (layer, params) in enumerate(zip(schedule.layers, rows)):
            prefix = prefix_of(i, l)
            state.update({prefix + k: v for k, v in params.items()})
            state.update({prefix + k: v for k, v in layer.state_dict().items()})
    return state


def _bake_staged(model, path) -> ResNet:
    firsts = [s.first for s in model.stages]
    block = Bottleneck if isinstance(firsts[0], Bottleneck) else BasicBlock
    w = model.conv1.weight
    net = ResNet(block, layers=[1 + s.num_layers for s in path.schedules], num_classes=path.num_classes,
                 in_chans=model.conv1.in_channels, global_pool=model.pool.pool_type, act_layer=type(model.act1),
                 channels=[f.conv1.out_channels for f in firsts], device=w.device, dtype=w.dtype)
    state = _stem_state(model, path, '')
    for i, (first, norms) in enumerate(zip(firsts, path.blocks)):
        prefix = f'layer{i + 1}.0.'
        state.update({prefix + k: v for k, v in first.state_dict().items()})
        for key, (scale, shift) in norms.affine(first).items():
            name = prefix + ('downsample.1' if key == 'downsample' else key) + '.'
            state.update({name + 'weight': scale, name + 'bias': shift})
            state.update({name + k: v for k, v in norms.norms[key].state_dict().items()})
    state.update(_layers_state(model, path, lambda i, l: f'layer{i + 1}.{l + 1}.'))
    state.update({f'fc.{k}': v for k, v in path.head.state_dict().items()})
    net.load_state_dict(state)
    return net


def _bake_isometric(model, path) -> nn.Sequential:
    conv, _, act, _ = model._stem_parts(path)
    width, dd = conv.out_channels, dict(device=conv.weight.device, dtype=conv.weight.dtype)
    act_layer = type(act)
    stem = nn.Sequential(OrderedDict([
        ('conv', nn.Conv2d(conv.in_channels, width, conv.kernel_size, conv.stride, conv.padding, bias=False, **dd)),
        ('bn', nn.BatchNorm2d(width, **dd)),
        ('act', act_layer(inplace=True)),
    ]))
    blocks = [BasicBlock(width, width, act_layer=act_layer, **dd) for s in path.schedules for _ in s.layers]
    net = nn.Sequential(OrderedDict([
        ('stem', stem),
        ('blocks', nn.Sequential(*blocks)),
        ('pool', SelectAdaptivePool2d(pool_type=model.pool.pool_type, flatten=True)),
        ('fc', nn.Linear(width, path.num_classes, **dd)),
    ]))
    offsets = [sum(s.num_layers for s in path.schedules[:i]) for i in range(len(path.schedules))]
    state = _stem_state(model, path, 'stem.')
    state.update(_layers_state(model, path, lambda i, l: f'blocks.{offsets[i] + l}.'))
    state.update({f'fc.{k}': v for k, v in path.head.state_dict().items()})
    net.load_state_dict(state)
    return net


def bake_task(model, task: str) -> nn.Module:
    """Task `task`'s network in eval mode as plain timm / torch modules (module docstring); outputs equal the
    task's path in eval mode."""
    path = model._path(task)
    net = _bake_staged(model, path) if model.staged else _bake_isometric(model, path)
    info = model.task_info.get(task, {})
    net.pretrained_cfg = dict(info.get('data_config') or model.data_config, num_classes=path.num_classes,
                              label_names=info.get('label_names'),
                              notes=(f'task {task!r} baked from a timm_isomix multi-task model',))
    return net.eval()
