"""How often each template is chosen by a `RoutedMultiTask`'s router (Routing Networks), and its figures.

    usage = route_usage(model, val_sets)     # per task x layer x template (and per class)
    plot_route_usage(usage, out_dir)         # routes.png, routes-per-class-<task>.png, routes-sharing.png
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..models.routed_multitask import RoutedMultiTask
from ..train.plots import js_sharing, plot_sharing, plot_task_mixtures
from .fit import model_device

__all__ = ['route_usage', 'plot_route_usage']


@torch.no_grad()
def route_usage(model: RoutedMultiTask, datasets: Dict[str, Dataset], batch_size: int = 256,
                device: Optional[Union[str, torch.device]] = None) -> Dict[str, Any]:
    """How often each template is chosen, in eval mode: {'per_task': {task: (L, K)}, 'per_class':
    {task: {class: (L, K)}}, 'js_per_layer': mean pairwise Jensen-Shannon divergence between tasks (L,)}.
    The images go to `device`, by default the model's."""
    device = model_device(model) if device is None else device
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
