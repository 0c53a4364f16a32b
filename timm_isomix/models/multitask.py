"""Tasks (or domains) owning mixtures over one template bank: multi-task isomix.

One isometric trunk's stem and `TemplateBank` are shared by every task. Each task owns a
`TaskPath`: the statistics of the stem's BatchNorm, one or two `Schedule`s (its own `Mixture`
logits and per-layer BatchNorm statistics) and a classifier head. With `share_from=i`, the
layers from i on take their mixture from one `Mixture` shared by all tasks (each task still
keeps its own statistics there). A new task is a new `TaskPath`: a few hundred logits and a
head, learned with the bank frozen (`timm_isomix.tasks.transfer`).
"""
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..bank import Mixture, Schedule, cyclic_order, order_logits
from ..blocks import batch_norm
from .isometric import IsoMixNet

__all__ = ['TaskPath', 'MultiTaskIsoMix', 'count_params']


def count_params(module_or_params: Union[nn.Module, Iterable[nn.Parameter]], trainable_only: bool = False) -> int:
    """Number of distinct parameter elements (shared tensors counted once)."""
    params = module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params
    seen = {}
    for p in params:
        if not trainable_only or p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


class TaskPath(nn.Module):
    """What one task owns: stem statistics, schedules (mixture logits + layer statistics), head."""

    def __init__(self, stem_stats: nn.BatchNorm2d, schedules: Sequence[Schedule], head: nn.Linear):
        super().__init__()
        self.stem_stats = stem_stats
        self.schedules = nn.ModuleList(schedules)
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def alpha(self) -> torch.Tensor:
        """Mixture weights (L, K) of all the layers this task runs."""
        return torch.cat([s.mixture.alpha() for s in self.schedules], 0)


class MultiTaskIsoMix(nn.Module):
    """One shared stem and bank, one `TaskPath` per task; `model(x, task=name)`."""

    def __init__(
            self,
            trunk: IsoMixNet,
            tasks: Dict[str, int],
            share_from: Optional[int] = None,
            init_logit: Optional[float] = None,
    ):
        """
        Args:
            trunk: an isometric isomix model with a learnable mixture; its stem and bank are taken
                (shared, not copied), its mixture logits and statistics seed every new task.
            tasks: task name -> number of classes.
            share_from: layers from this index on share one mixture across tasks (None: no sharing).
            init_logit: if given, tasks start from the cyclic order with this logit (a soft start
                from which mixtures can move) instead of the trunk's logits.
        """
        super().__init__()
        mixture = trunk.schedule.mixture
        if mixture.is_hard:
            raise ValueError('the trunk runs a hard order; multi-task mixtures need learnable logits '
                             '(build the trunk without `order`)')
        depth, k = mixture.num_layers, mixture.num_templates
        if share_from is not None and not 0 <= share_from <= depth:
            raise ValueError(f'share_from must be a layer index in 0..{depth}, got {share_from}')
        self.depth, self.num_templates, self.temperature = depth, k, mixture.temperature
        self.share_from = share_from if share_from is not None and share_from < depth else None
        self.num_features = trunk.num_features
        self.stem = trunk.stem
        self.bank = trunk.bank
        self.layer_fn = trunk.schedule.layer_fn
        self.pool = trunk.global_pool
        # Seeds for new tasks: the trunk's logits (or a soft cyclic start) and statistics.
        logits = mixture.logits.detach().clone()
        if init_logit is not None:
            logits = order_logits(cyclic_order(depth, k), k, init_logit).to(logits)
        # Plain tensors and state dicts, not submodules: seeds are no part of the model's state.
        self._seed_logits = logits
        self._seed_stem_state = {k: v.detach().clone() for k, v in _stats_of(trunk.stem.bn).state_dict().items()}
        self._seed_layer_states = [{k: v.detach().clone() for k, v in layer.state_dict().items()}
                                   for layer in trunk.schedule.layers]
        self.shared_mixture = None
        if self.share_from is not None:
            self.shared_mixture = self._mixture(self.share_from, depth, logits)
        self.tasks = nn.ModuleDict()
        for name, num_classes in tasks.items():
            self.add_task(name, num_classes)

    # --- tasks ------------------------------------------------------------------------------
    def _mixture(self, start: int, end: int, logits: torch.Tensor) -> Mixture:
        # On the bank's device: the seeds stay where the trunk was built, the model may have moved since.
        m = Mixture(end - start, self.num_templates, temperature=self.temperature,
                    device=self.bank.weight.device, dtype=self.bank.weight.dtype)
        with torch.no_grad():
            m.logits.copy_(logits[start:end])
        return m

    def _schedule(self, mixture: Mixture, layer_states: Sequence[dict]) -> Schedule:
        s = Schedule(self.layer_fn, mixture, device=self.bank.weight.device, dtype=self.bank.weight.dtype)
        for layer, state in zip(s.layers, layer_states):
            layer.load_state_dict(state)
        return s

    def add_task(
            self,
            name: str,
            num_classes: int,
            init_from: Optional[str] = None,
            share_head_with: Optional[str] = None,
            share_trunk_with: Optional[str] = None,
    ) -> TaskPath:
        """Add a task to a (trained) model.

        Args:
            name: the new task's name.
            num_classes: classes of its head.
            init_from: start its mixture logits and statistics from this task's (default: the seeds).
            share_head_with: use this task's head (the same module: e.g. one classifier for several domains).
            share_trunk_with: use this task's stem statistics and schedules (the same modules): a
                hard-shared trunk, only the head is the new task's own.
        """
        if not isinstance(name, str) or not name or '.' in name or name in self.tasks:
            raise ValueError(f'task name must be a new non-empty string without ".", got {name!r} '
                             f'(existing tasks: {list(self.tasks)})')
        if int(num_classes) < 1:
            raise ValueError(f'task {name!r} needs at least one class, got num_classes={num_classes}')
        for other in (init_from, share_head_with, share_trunk_with):
            if other is not None:
                self._path(other)
        dd = dict(device=self.bank.weight.device, dtype=self.bank.weight.dtype)
        if share_head_with is not None:
            head = self.tasks[share_head_with].head
            if head.out_features != num_classes:
                raise ValueError(f'task {name!r} has {num_classes} classes but the head of {share_head_with!r} '
                                 f'it should share has {head.out_features}')
        else:
            head = nn.Linear(self.num_features, num_classes, **dd)
        if share_trunk_with is not None:
            src = self.tasks[share_trunk_with]
            path = TaskPath(src.stem_stats, list(src.schedules), head)
        else:
            if init_from is not None:
                src = self.tasks[init_from]
                logits = torch.cat([s.mixture.logits.detach() for s in src.schedules], 0)
                stem_state = src.stem_stats.state_dict()
                layers = [layer.state_dict() for s in src.schedules for layer in s.layers]
            else:
                logits, stem_state, layers = self._seed_logits, self._seed_stem_state, self._seed_layer_states
            own = self.share_from if self.share_from is not None else self.depth
            schedules = []
            if own > 0:
                schedules.append(self._schedule(self._mixture(0, own, logits), layers[:own]))
            if self.shared_mixture is not None:
                schedules.append(self._schedule(self.shared_mixture, layers[own:]))
            stem_stats = _stats_of(self.stem.bn)
            stem_stats.load_state_dict(stem_state)
            path = TaskPath(stem_stats, schedules, head)
        path.train(self.training)
        self.tasks[name] = path
        return path

    def _path(self, task: str) -> TaskPath:
        if task not in self.tasks:
            raise KeyError(f'unknown task {task!r}; this model has tasks {list(self.tasks)}')
        return self.tasks[task]

    def mixtures(self) -> Dict[str, Mixture]:
        """Every distinct mixture, by name ('<task>.<i>' for a task's own, 'shared' for the shared one)."""
        out = {}
        for name, path in self.tasks.items():
            for i, s in enumerate(path.schedules):
                if s.mixture is not self.shared_mixture and all(s.mixture is not m for m in out.values()):
                    out[f'{name}.{i}'] = s.mixture
        if self.shared_mixture is not None:
            out['shared'] = self.shared_mixture
        return out

    def alphas(self) -> Dict[str, torch.Tensor]:
        """Mixture weights (L, K) per task."""
        return {name: path.alpha().detach() for name, path in self.tasks.items()}

    def task_parameters(self, task: str) -> List[nn.Parameter]:
        """The parameters only this task uses: its own mixture logits and its head (unless shared)."""
        path = self._path(task)
        shared = {id(p) for other, op in self.tasks.items() if other != task for p in op.parameters()}
        shared |= {id(p) for p in self.bank.parameters()} | {id(p) for p in self.stem.parameters()}
        return [p for p in path.parameters() if id(p) not in shared]

    def task_state_dict(self, task: str) -> Dict[str, torch.Tensor]:
        """One task's checkpoint: its mixtures (incl. the shared one), statistics and head."""
        return {k: v.detach().clone() for k, v in self._path(task).state_dict().items()}

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'*mixture.logits', 'bank.affine', 'stem.bn.*'}

    # --- forward ----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, task: str) -> torch.Tensor:
        path = self._path(task)
        x = self.stem.conv(x)
        x = self.stem.act(batch_norm(x, path.stem_stats, self.stem.bn.weight, self.stem.bn.bias))
        for schedule in path.schedules:
            x = schedule(x, self.bank)
        return x

    def forward_head(self, x: torch.Tensor, task: str, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self._path(task).head(x)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, task), task)


def _stats_of(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """An affine-free BatchNorm holding a copy of `bn`'s running statistics."""
    stats = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=False,
                           device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    stats.load_state_dict({k: v for k, v in bn.state_dict().items() if k not in ('weight', 'bias')})
    return stats
