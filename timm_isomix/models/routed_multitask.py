"""Routing Networks in multi-task training: one routed trunk, a head per task (`RoutedMultiTask`).

    model = build_routed_task_model('isomix_iso_64_8_p2', {'mnist': 10, 'cifar10': 10}, routing='task', router='wpl')
    history = fit_tasks(model, train_sets, val_sets, router_lr=...)   # tasks.fit: one batch of every task per step

A `RoutedMultiTask` is one routed trunk (stem, bank, executed layers with their statistics, router) shared by
every task, and one head per task. The router tells the tasks apart by their task ids (a per-task router's
table row, or a per-input router's task embedding); that is all a task owns besides its head, as in the
paper's CIFAR-MTL and MIN-MTL models. Unlike `MultiTaskIsoMix`, tasks share the BatchNorm statistics:
each executed layer keeps one set per template, whichever task runs it (see bank.RoutedLayer).
"""
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn as nn

from .isometric import IsoMixNet
from .routers import Router, routing_loss

__all__ = ['RoutedMultiTask', 'build_routed_task_model']


class RoutedMultiTask(nn.Module):
    """Tasks over one routed isometric trunk: `model(x, task=name)`; each task owns a head."""

    def __init__(self, trunk: IsoMixNet, tasks: Dict[str, int]):
        super().__init__()
        if not isinstance(trunk, IsoMixNet) or trunk.router is None:
            raise ValueError('RoutedMultiTask needs an isometric isomix trunk built with routing= (isomix_iso_*)')
        if trunk.num_classes != 0:
            raise ValueError(f'the trunk has a classifier ({trunk.num_classes} classes); build it with num_classes=0')
        if len(tasks) > trunk.router.num_tasks:
            raise ValueError(f'{len(tasks)} tasks but the trunk\'s router tells {trunk.router.num_tasks} apart; '
                             f'build it with num_tasks={len(tasks)}')
        bad = [n for n in tasks if not isinstance(n, str) or not n or '.' in n]
        if bad:
            raise ValueError(f'task names must be non-empty strings without ".", got {bad}')
        self.trunk = trunk
        self.task_ids = {name: i for i, name in enumerate(tasks)}
        dd = dict(device=trunk.bank.weight.device, dtype=trunk.bank.weight.dtype)
        self.heads = nn.ModuleDict({name: nn.Linear(trunk.num_features, int(n), **dd) for name, n in tasks.items()})

    @property
    def router(self) -> Router:
        return self.trunk.router

    def _path(self, task: str) -> int:
        if task not in self.task_ids:
            raise KeyError(f'unknown task {task!r}; this model has tasks {list(self.task_ids)}')
        return self.task_ids[task]

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        features = self.trunk.forward_features(x, task=self._path(task))
        return self.heads[task](self.trunk.global_pool(features))

    # --- hooks of tasks.fit.fit_tasks ---------------------------------------------------------
    def routing_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The router's loss for the last forward (one task's batch)."""
        return routing_loss([self.router], output, target)

    def set_progress(self, progress: float) -> None:
        self.router.set_progress(progress)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {f'trunk.{n}' for n in self.trunk.no_weight_decay()}

    def param_counts(self) -> Dict[str, object]:
        """Parameter counts as `MultiTaskIsoMix.param_counts`: 'total', 'shared' (the trunk and its router),
        'own' per task (its head: a task's router row or embedding is a slice of a shared tensor) and 'used'
        per task (the trunk and its own head: its network's size)."""
        heads = {t: sum(p.numel() for p in h.parameters()) for t, h in self.heads.items()}
        total = sum(p.numel() for p in self.parameters())
        trunk = total - sum(heads.values())
        return {'total': total, 'shared': trunk, 'own': heads, 'used': {t: trunk + n for t, n in heads.items()}}


def build_routed_task_model(
        model: str,
        tasks: Dict[str, int],
        routing: str = 'task',
        router: str = 'reinforce',
        router_args: Optional[Dict[str, Any]] = None,
        **model_kwargs,
) -> RoutedMultiTask:
    """A routed trunk `model` (an isomix_iso_* name) with one head per task (name -> classes)."""
    trunk = timm.create_model(model, num_classes=0, routing=routing, router=router, num_tasks=len(tasks),
                              router_args=router_args, **model_kwargs)
    return RoutedMultiTask(trunk, tasks)
