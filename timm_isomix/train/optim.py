"""Optimizer of an isomix model: timm's parameter groups, plus one group for the mixture logits, one for the
routers (Routing Networks: policy tables or nets, baselines, values) and, when asked, one for the tasks'
patches (per-task BatchNorm scale and shift, models/multitask.py)."""
import argparse
import logging
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from timm.optim import create_optimizer_v2, optimizer_kwargs, param_groups_layer_decay, param_groups_weight_decay

__all__ = ['MIXTURE_SUFFIX', 'mixture_param_groups', 'is_router_param', 'is_patch_param', 'model_lr',
           'create_optimizer', 'resolve_lr']

_logger = logging.getLogger('train')

MIXTURE_SUFFIX = 'mixture.logits'


def is_router_param(name: str) -> bool:
    """A router's parameter (models/routers.py: a module named `router`, or `routers`)."""
    return any(part in ('router', 'routers') for part in name.split('.')[:-1])


def is_patch_param(name: str) -> bool:
    """A task's own BatchNorm scale and shift (models/multitask.py: `patch_stem`, `patch_layers`)."""
    return name.rsplit('.', 1)[-1].startswith('patch_')


def mixture_param_groups(
        model: nn.Module,
        weight_decay: float,
        lr: float,
        mixture_lr_mult: float = 1.0,
        layer_decay: Optional[float] = None,
        router_lr: Optional[float] = None,
        patch_lr_mult: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """timm's parameter groups (weight decay / layer decay as timm builds them) with the mixture logits
    moved to a group of their own: `weight_decay=0`, `lr = lr * mixture_lr_mult`.

    The group carries an explicit 'lr', so timm's schedulers (which scale each group's initial lr)
    keep the ratio throughout the schedule. Router parameters form a group of their own too:
    `weight_decay=0`, `lr = router_lr` (default `lr`). With `patch_lr_mult`, the tasks' patches form a group
    too: `weight_decay=0`, `lr = lr * patch_lr_mult` (like the mixture logits, they are a task's own few
    parameters; at the base lr they learn from one task's batches only and lag the shared ones).
    """
    no_wd = set(getattr(model, 'no_weight_decay', lambda: set())())
    if layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                          no_weight_decay_list=no_wd)
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_wd)
    mixture = [p for n, p in model.named_parameters() if n.endswith(MIXTURE_SUFFIX) and p.requires_grad]
    router = [p for n, p in model.named_parameters() if is_router_param(n) and p.requires_grad]
    patch = [] if patch_lr_mult is None else [
        p for n, p in model.named_parameters() if is_patch_param(n) and p.requires_grad]
    ids = {id(p) for p in mixture + router + patch}
    out = []
    for g in groups:
        params = [p for p in g['params'] if id(p) not in ids]
        if params:
            out.append({**g, 'params': params})
    if mixture:
        out.append({'params': mixture, 'weight_decay': 0., 'lr': lr * mixture_lr_mult, 'group_name': 'mixture'})
    if router:
        out.append({'params': router, 'weight_decay': 0., 'lr': lr if router_lr is None else router_lr,
                    'group_name': 'router'})
    if patch:
        out.append({'params': patch, 'weight_decay': 0., 'lr': lr * patch_lr_mult, 'group_name': 'patch'})
    return out


def model_lr(optimizer: torch.optim.Optimizer) -> float:
    """The mean lr of the model's own groups: the mixture, router and patch groups run at their own rates."""
    own = ('mixture', 'router', 'patch')
    lrs = [g['lr'] for g in optimizer.param_groups if g.get('group_name') not in own] or [0.]
    return sum(lrs) / len(lrs)


def create_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """timm.optim.create_optimizer_v2 with timm's optimizer flags and the mixture group."""
    kwargs = optimizer_kwargs(cfg=args)
    groups = mixture_param_groups(
        model, kwargs.pop('weight_decay'), args.lr, args.mixture_lr_mult, kwargs.pop('layer_decay', None),
        router_lr=getattr(args, 'router_lr', None))
    kwargs.pop('layer_decay_min_scale', None)
    kwargs.pop('layer_decay_no_opt_scale', None)
    return create_optimizer_v2(groups, **kwargs)


def resolve_lr(args: argparse.Namespace) -> None:
    """Set args.lr from --lr-base when --lr is not given (timm's rule: scaled by the global batch)."""
    if args.lr is not None:
        return
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    if scale == 'sqrt':
        ratio = ratio ** 0.5
    args.lr = args.lr_base * ratio
    _logger.info(f'Learning rate ({args.lr}) from base {args.lr_base} x {scale} batch ratio ({global_batch}/{args.lr_base_size})')


