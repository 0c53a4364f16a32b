"""What one task owns over a shared backbone (`TaskPath`), and how a batch's examples name their tasks.

A `TaskPath` holds a task's stem statistics, one `Schedule` per bank (its mixture logits and per-layer statistics),
its head, the norms of the unbanked blocks of a staged backbone (models/task_norms.py), and optionally a patch
(its own BatchNorm scale and shift) and a trunk (its own stem and bank). `MultiTaskIsoMix` (models/multitask.py)
runs it over the shared modules.
"""
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bank import INIT_LOGIT, SHARP_LOGIT, Mixture, Schedule, TemplateBank, cyclic_order, order_logits
from .task_norms import BlockNorms

__all__ = ['Tasks', 'count_params', 'TaskPath', 'SharedStage', 'seed_logits', 'start_logits', 'run_patched',
           'route_tasks']

# One task name, one name per example, or a tensor of indices into list(model.tasks).
Tasks = Union[str, Sequence[str], torch.Tensor]


def count_params(module_or_params: Union[nn.Module, Iterable[nn.Parameter]], trainable_only: bool = False) -> int:
    """Number of distinct parameter elements (shared tensors counted once)."""
    params = module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params
    seen = {}
    for p in params:
        if not trainable_only or p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


class TaskPath(nn.Module):
    """What one task owns: stem statistics, schedules (mixture logits + layer statistics), head, the norms of the
    unbanked blocks (staged backbones); optionally a patch (its own BatchNorm scale and shift) and a trunk."""

    def __init__(
            self,
            stem_stats: nn.BatchNorm2d,
            schedules: Sequence[Schedule],
            head: nn.Linear,
            patch_stem: Optional[nn.Parameter] = None,
            patch_layers: Optional[nn.Parameter] = None,
            stem: Optional[nn.Module] = None,
            bank: Optional[TemplateBank] = None,
            blocks: Sequence[BlockNorms] = (),
    ):
        super().__init__()
        self.stem_stats = stem_stats
        self.schedules = nn.ModuleList(schedules)
        self.head = head
        # patch_stem: (2, C) scale and shift of the stem's BatchNorm; patch_layers: every executed layer's scale and
        # shift in its bank's affine layout, (L, A) over one bank, the banks' rows one after another, flat, over
        # banks of different widths. None: the shared stem's and the banks' (mixed) ones.
        self.register_parameter('patch_stem', patch_stem)
        self.register_parameter('patch_layers', patch_layers)
        self.register_module('stem', stem)  # None: the model's shared stem and bank
        self.register_module('bank', bank)
        self.blocks = nn.ModuleList(blocks)  # per stage of a staged backbone: its unbanked block's norms

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def has_patch(self) -> bool:
        return self.patch_layers is not None

    def alpha(self) -> torch.Tensor:
        """Mixture weights (L, K) of all the layers this task runs (banks of several K: each row padded with 0)."""
        k = max(s.mixture.num_templates for s in self.schedules)
        return torch.cat([F.pad(s.mixture.alpha(), (0, k - s.mixture.num_templates)) for s in self.schedules], 0)

    def mixture_logits(self, shared: Optional[Mixture] = None) -> List[nn.Parameter]:
        """The logits of this path's mixtures, except `shared` (the model's shared mixture)."""
        return [s.mixture.logits for s in self.schedules if s.mixture is not shared]

    def patch_parameters(self) -> List[nn.Parameter]:
        """The patch: the own scale and shift of the stem, the layers and the unbanked blocks ([] without one)."""
        if not self.has_patch:
            return []
        return [self.patch_stem, self.patch_layers] + [b.patch_norms for b in self.blocks]

    def norm_stats(self) -> List[nn.modules.batchnorm._BatchNorm]:
        """Every BatchNorm holding this task's running statistics (stem, unbanked blocks and layers)."""
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.affine]


class SharedStage(nn.Module):
    """A staged backbone's stage as the tasks share it: the unbanked first block and the bank."""

    def __init__(self, first: nn.Module, bank: TemplateBank):
        super().__init__()
        self.first = first
        self.bank = bank


def run_patched(schedule: Schedule, x: torch.Tensor, bank: TemplateBank, affine: torch.Tensor) -> torch.Tensor:
    """A schedule's layers with the mixed kernels of its mixture and the task's own scale and shift rows."""
    if schedule.mixture.is_hard:
        raise ValueError('a patched task needs a soft mixture (one kernel row per layer), not a hard order')
    weight, _ = schedule.mixture(bank.weight, bank.affine)
    for layer, params in zip(schedule.layers, bank.unflatten_rows(weight, affine, schedule.num_layers)):
        x = layer(x, params)
    return x


def route_tasks(task: Tasks, names: Sequence[str], batch: int,
                device: torch.device) -> Tuple[Optional[str], Optional[torch.Tensor]]:
    """(name, None) when every example of the batch is one task's, else (None, per-example index into `names`).

    `task`: a task name, a list of one name per example, or a tensor of one index into `names` per example.
    Raises KeyError for an unknown name and ValueError for a task argument of the wrong kind or length.
    """
    if isinstance(task, str):
        if task not in names:
            raise KeyError(f'unknown task {task!r}; this model has tasks {list(names)}')
        return task, None
    names = list(names)
    if isinstance(task, torch.Tensor):
        if task.dim() != 1 or len(task) != batch or task.is_floating_point():
            raise ValueError(f'task as a tensor: one integer index into {names} per example, shape ({batch},); '
                             f'got {task.dtype} of shape {tuple(task.shape)}')
        index = task.to(device=device, dtype=torch.long)
        if len(index) and (index.min() < 0 or index.max() >= len(names)):
            raise ValueError(f'task indices must be in 0..{len(names) - 1} (tasks {names}), got '
                             f'{sorted(set(index.tolist()))}')
    elif isinstance(task, (list, tuple)):
        if len(task) != batch:
            raise ValueError(f'task as a list: one name per example, {batch} names; got {len(task)}')
        position = {n: i for i, n in enumerate(names)}
        unknown = [t for t in dict.fromkeys(task) if t not in position]
        if unknown:
            raise KeyError(f'unknown task {unknown[0]!r}; this model has tasks {names}')
        index = torch.tensor([position[t] for t in task], dtype=torch.long, device=device)
    else:
        raise ValueError(f'task must be a task name, a list of names or a tensor of indices; got {type(task).__name__}')
    used = index.unique().tolist()
    return (names[used[0]], None) if len(used) == 1 else (None, index)


def seed_logits(mixtures: Sequence[Mixture], init_logit: Optional[float] = None) -> List[torch.Tensor]:
    """The logits (L, K) per bank a backbone's tasks start from: its mixtures' logits, a hard order as sharp logits
    (SHARP_LOGIT times the temperature: that order to float32 precision); with `init_logit`, the hard order (else
    the cyclic order) at that logit."""
    out = []
    for m in mixtures:
        if init_logit is not None:
            out.append(order_logits(m.order or cyclic_order(m.num_layers, m.num_templates), m.num_templates, init_logit))
        elif m.is_hard:
            out.append(order_logits(m.order, m.num_templates, SHARP_LOGIT * m.temperature))
        else:
            out.append(m.logits.detach().clone())
        out[-1] = out[-1].to(next(iter(m.parameters()), out[-1]))
    return out


def start_logits(logits: torch.Tensor, temperature: float, init_logit: Optional[float]) -> torch.Tensor:
    """A new task's logits from its source's: at the source's order with `init_logit` when given, or with INIT_LOGIT
    when the source's are sharp (a hard order or a warm start: exactly SHARP_LOGIT * temperature on one template
    per layer, 0 on the others, where the softmax has no gradient); else the source's own."""
    order = logits.argmax(-1).tolist()
    k = logits.shape[1]
    if init_logit is None and torch.equal(logits, order_logits(order, k, SHARP_LOGIT * temperature).to(logits)):
        init_logit = INIT_LOGIT
    return logits if init_logit is None else order_logits(order, k, init_logit).to(logits)
