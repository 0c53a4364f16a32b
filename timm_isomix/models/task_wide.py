"""A mixed-task batch over an isometric backbone, its tasks run side by side as one wide network.

Grouped by task (`bank.run_routed`), a batch of 64 over 4 tasks runs every layer 4 times on 16 examples, and on a
CPU a convolution of 16 examples costs more than a quarter of one of 64 (on the multi-task studies' trunk:
tools/bench_tasks.py, `grouped` against `one_task`). Side by side, the tasks' layers form one layer with T times
the channels: each task's group, padded to the largest group's size m, is laid out as channels (m, T * C, H, W),
every convolution is grouped (`groups=T`: the channels of task t meet only task t's kernels) and every
normalization takes the tasks' statistics, scales and shifts one after another. Each task therefore computes its
own path, and the batch runs as one batch.

It applies in eval without autograd (serving; training normalizes each task's group with its own batch statistics,
which padding would change), over an isometric backbone whose tasks share its stem convolution and bank (no
`own_trunk`), when padding adds at most a quarter of the batch. Otherwise the caller groups by task. The staged
backbones stay grouped: their strided first blocks and larger images keep the grouped batch within 1.2x.
The wide layers are built once and kept until a tensor they come from changes (as `bank.Mixture` keeps its rows).
"""
import copy
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ..blocks import batch_norm
from .bake import layer_params
from .task_path import TaskPath

__all__ = ['SideBySide', 'MAX_PADDING']

MAX_PADDING = 0.25  # padded examples per example of the batch, at most


def _cat_stats(norms: Sequence[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    """One eval BatchNorm (no affine) holding the running statistics of `norms`, one after another."""
    wide = copy.deepcopy(norms[0]).eval()
    wide.running_mean = torch.cat([n.running_mean for n in norms])
    wide.running_var = torch.cat([n.running_var for n in norms])
    wide.num_features = wide.running_mean.numel()
    return wide


def _wide_layer(layers: Sequence[nn.Module]) -> nn.Module:
    """The tasks' executed layers (one per task, same kind) as one layer over their channels side by side."""
    wide = copy.deepcopy(layers[0]).eval()
    for name, norm in list(wide.named_modules()):
        if isinstance(norm, nn.BatchNorm2d):
            wide.set_submodule(name, _cat_stats([layer.get_submodule(name) for layer in layers]))
    wide.groups = len(layers)
    return wide


class SideBySide:
    """Runs a mixed batch's tasks side by side (module docstring); `MultiTaskIsoMix` holds one."""

    enabled = True  # False: mixed batches are grouped by task everywhere (as in training)

    def __init__(self):
        self._cache = None  # (key, the tensors the key names, the wide stem norm, scale, shift, layers, params)

    def __getstate__(self):  # deepcopy / pickle: the wide layers are derived state
        return {**self.__dict__, '_cache': None}

    def applies(self, model, paths: Sequence[TaskPath]) -> bool:
        return (self.enabled and not model.staged and not model.training and not torch.is_grad_enabled()
                and not torch.jit.is_scripting() and not torch.compiler.is_compiling()
                and all(p.stem is None and p.bank is None for p in paths))

    def __call__(self, model, x: torch.Tensor, index: torch.Tensor) -> Optional[torch.Tensor]:
        """The features of `x`, example b under task `index[b]` (into `model.tasks`); None where it does not apply."""
        names = list(model.tasks)
        counts = torch.bincount(index, minlength=len(names)).tolist()
        used = [k for k, c in enumerate(counts) if c]
        t, m, b = len(used), max(counts), x.shape[0]
        paths = [model.tasks[names[k]] for k in used]
        if t * m - b > MAX_PADDING * b or not self.applies(model, paths):
            return None
        stem_stats, scale, shift, layers, params = self._build(model, [names[k] for k in used], paths)
        # each example's slot in the padded, task-major batch (t * m, ...): used task g's j-th example at g * m + j
        ranks = [torch.arange(counts[k], device=x.device) + g * m for g, k in enumerate(used)]
        slot = torch.empty_like(index).scatter_(0, torch.argsort(index, stable=True), torch.cat(ranks))
        stem = model.stem
        y = stem.conv(x)
        padded = y.new_zeros(t * m, *y.shape[1:]).index_copy_(0, slot, y)
        c, h, w = y.shape[1:]
        y = padded.view(t, m, c, h, w).transpose(0, 1).reshape(m, t * c, h, w)
        y = stem.act(batch_norm(y, stem_stats, scale, shift))
        for layer, p in zip(layers, params):
            y = layer(y, p)
        c, h, w = y.shape[1] // t, y.shape[2], y.shape[3]
        return y.view(m, t, c, h, w).transpose(0, 1).reshape(t * m, c, h, w).index_select(0, slot)

    def _build(self, model, names: List[str], paths: Sequence[TaskPath]):
        sources = [*model.stem.parameters(), *model.stem.buffers(), *model.bank.parameters()]
        sources += [v for p in paths for v in (*p.parameters(), *p.buffers())]
        key = (tuple(names), tuple((v.data_ptr(), v._version, v.dtype, v.device) for v in sources),
               torch.is_inference_mode_enabled())
        if self._cache is None or self._cache[0] != key:
            bn = model.stem.bn
            scales = [p.patch_stem[0] if p.patch_stem is not None else bn.weight for p in paths]
            shifts = [p.patch_stem[1] if p.patch_stem is not None else bn.bias for p in paths]
            per_task = [[row for rows in layer_params(model, p) for row in rows] for p in paths]
            layers = [_wide_layer(ls) for ls in zip(*[[l for s in p.schedules for l in s.layers] for p in paths])]
            params = [{n: torch.cat([p[n] for p in ps]) for n in ps[0]} for ps in zip(*per_task)]
            self._cache = (key, sources, _cat_stats([p.stem_stats for p in paths]), torch.cat(scales),
                           torch.cat(shifts), layers, params)
        return self._cache[2:]

