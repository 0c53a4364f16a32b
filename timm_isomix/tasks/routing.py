"""Routing Networks in multi-task training, and how often each template is chosen.

    model = build_routed_task_model('isomix_iso_64_8_p2', {'mnist': 10, 'cifar10': 10}, routing='task', router='wpl')
    history = fit_tasks(model, train_sets, val_sets, router_lr=...)   # tasks.fit: one batch of every task per step
    usage = route_usage(model, val_sets)                              # per task x layer x template (and per class)
    plot_route_usage(usage, out_dir)                    # routes.png, routes-per-class-<task>.png, routes-sharing.png

A `RoutedMultiTask` is one routed trunk (stem, bank, executed layers with their statistics, router) shared by
every task, and one head per task. The router tells the tasks apart by their task ids (a per-task router's
table row, or a per-input router's task embedding); that is all a task owns besides its head, as in the
paper's CIFAR-MTL and MIN-MTL models. Unlike `MultiTaskIsoMix`, tasks share the BatchNorm statistics:
each executed layer keeps one set per template, whichever task runs it (see bank.RoutedLayer).

The routers learn in `tasks.fit.fit_tasks` through two hooks this model provides: `routing_loss(output,
target)` after each task's forward (the reward of each example, see train.loop.routing_loss) and
`set_progress(fraction)` (the Gumbel temperature schedule).

Route usage is measured in eval mode (argmax routes, what the model runs at test time): per task the
fraction of its examples that run each template at each layer, (L, K) like a mixture's alpha, so the same
Jensen-Shannon sharing measure as the mixtures applies (train.plots.js_sharing); for per-input routes also
per class.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..models.isometric import IsoMixNet
from ..models.routing import Router
from ..train.loop import routing_loss
from ..train.plots import js_sharing, plot_sharing, plot_task_mixtures

__all__ = ['RoutedMultiTask', 'build_routed_task_model', 'route_usage', 'plot_route_usage']


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


@torch.no_grad()
def route_usage(model: RoutedMultiTask, datasets: Dict[str, Dataset], batch_size: int = 256,
                device: Union[str, torch.device] = 'cpu') -> Dict[str, Any]:
    """How often each template is chosen, in eval mode: {'per_task': {task: (L, K)}, 'per_class':
    {task: {class: (L, K)}}, 'js_per_layer': mean pairwise Jensen-Shannon divergence between tasks (L,)}."""
    was_training = model.training
    model.eval()
    k = model.router.num_templates
    per_task, per_class = {}, {}
    for task, ds in datasets.items():
        counts: Dict[int, torch.Tensor] = {}
        for x, y in DataLoader(ds, batch_size=batch_size):
            model(x.to(device), task=task)
            one_hot = nn.functional.one_hot(model.router.last_routes.cpu(), k).float()  # (B, L, K)
            for c in y.unique().tolist():
                counts[c] = counts.get(c, 0) + one_hot[y == c].sum(0)
        total = sum(counts.values())
        per_task[task] = total / total.sum(-1, keepdim=True)
        per_class[task] = {c: v / v.sum(-1, keepdim=True) for c, v in sorted(counts.items())}
    model.train(was_training)
    js = js_sharing(per_task) if len(per_task) > 1 else torch.zeros(model.router.num_layers)
    return {'per_task': per_task, 'per_class': per_class, 'js_per_layer': js}


def plot_route_usage(usage: Dict[str, Any], folder: Union[str, Path], max_classes: int = 10) -> List[Path]:
    """routes.png (task x layer x template), routes-sharing.png (Jensen-Shannon per layer) and, when the
    routes differ within a task (per-input routing), routes-per-class-<task>.png for its first classes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [plot_task_mixtures(usage['per_task'], folder / 'routes.png', title='route frequency per task')]
    if len(usage['per_task']) > 1:
        paths.append(plot_sharing(usage['per_task'], folder / 'routes-sharing.png'))
    for task, classes in usage['per_class'].items():
        rows = list(classes.values())
        if any(not torch.equal(r, rows[0]) for r in rows[1:]):
            shown = {f'class {c}': v for c, v in list(classes.items())[:max_classes]}
            paths.append(plot_task_mixtures(shown, folder / f'routes-per-class-{task}.png',
                                            title=f'{task}: route frequency per class'))
    return paths
