"""LoRA on a plain timm network through the `peft` library, and the baselines beside it (linear probe, full
fine-tuning): what users compare a task adapter with (issue 20).

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) keeps a layer's weight W
and learns W + (alpha / r) B A. For a convolution (out, in, kh, kw), peft's A is an (r, in, kh, kw)
convolution and B an (out, r, 1, 1) one, B starting at zero: the adapted network starts as the one it
adapts. `lora_count` is that count, so `choose_targets` can pick the convolutions for a budget before peft
runs: it takes them from one end of the network (the head's or the stem's) until the count is closest to
the budget (e.g. an adapter's trainable parameters). The head trains in full (peft's `modules_to_save`).

A plain network transfers as `timm_isomix.tasks.transfer` transfers a task over a bank, on the same loop
(`fit_tasks`): its BatchNorm statistics are re-estimated on the new task's images first (AdaBN), follow the
data while training (except for a linear probe, which changes no activation) and are re-estimated once more
at the end. What a task must ship (its trained tensors and its statistics) is measured in safetensors bytes.
"""
import re
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from timm_isomix.tasks.fit import evaluate, fit_tasks, model_device

__all__ = ['PLAIN_MODES', 'conv_layers', 'lora_count', 'choose_targets', 'add_lora', 'trainable_count',
           'reestimate_bn', 'bn_statistics', 'safetensors_bytes', 'transfer_plain']

# What learns in each way of training a plain network for a new task.
PLAIN_MODES = ('lora', 'linear', 'full')
ENDS = ('head', 'stem')


def conv_layers(model: nn.Module) -> List[str]:
    """Names of the model's `nn.Conv2d` layers in module order (as timm builds them: stem to head)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def lora_count(layer: nn.Module, rank: int) -> int:
    """Parameters peft's LoRA of `rank` adds to a Conv2d (A: r x in x kh x kw, B: out x r) or a Linear."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f'LoRA here targets ungrouped convolutions, got groups={layer.groups}')
        kh, kw = layer.kernel_size
        return rank * (layer.in_channels * kh * kw + layer.out_channels)
    if isinstance(layer, nn.Linear):
        return rank * (layer.in_features + layer.out_features)
    raise TypeError(f'LoRA targets nn.Conv2d or nn.Linear, got {type(layer).__name__}')


def choose_targets(model: nn.Module, budget: int, rank: int = 1, end: str = 'head') -> List[str]:
    """The convolutions, taken from `end` ('head': the last ones first; 'stem': the first ones first),
    whose LoRA of `rank` has the parameter count closest to `budget` (at least one layer); module order."""
    if end not in ENDS:
        raise ValueError(f'end must be one of {ENDS}, got {end!r}')
    names = conv_layers(model)
    if not names:
        raise ValueError('the model has no nn.Conv2d layer to adapt')
    modules = dict(model.named_modules())
    ordered = names[::-1] if end == 'head' else names
    total, best, best_n = 0, None, 1
    for n, name in enumerate(ordered, 1):
        total += lora_count(modules[name], rank)
        if best is None or abs(total - budget) < best:
            best, best_n = abs(total - budget), n
    chosen = set(ordered[:best_n])
    return [n for n in names if n in chosen]


def add_lora(model: nn.Module, targets: Sequence[str], rank: int, head: str, alpha: Optional[float] = None):
    """peft's LoRA of `rank` on the named layers (exact module names), the `head` module trained in full,
    every other parameter frozen; scaling alpha / rank (default alpha = rank: 1). Returns the PeftModel."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # an extra of the studies, not of the library
        raise ImportError('LoRA baselines need peft: pip install -e ".[experiments]"') from e
    if not targets:
        raise ValueError('LoRA needs at least one target layer')
    modules = dict(model.named_modules())
    missing = [t for t in [*targets, head] if t not in modules]
    if missing:
        raise ValueError(f'no modules named {missing} in the model')
    # a string is matched against whole module names (a list would match name suffixes: 'conv1' is in every block)
    pattern = '|'.join(re.escape(t) for t in targets)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=0.,
                        target_modules=f'({pattern})', modules_to_save=[head], bias='none')
    return get_peft_model(model, config)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _norms(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_bn(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> None:
    """Replace every BatchNorm's running statistics by their average over `dataset` (AdaBN)."""
    if len(dataset) == 0:
        raise ValueError('cannot re-estimate statistics on an empty dataset')
    norms = _norms(model)
    was_training = model.training
    model.eval()
    saved = [m.momentum for m in norms]
    for m in norms:  # momentum None: the cumulative average over the batches seen
        m.reset_running_stats()
        m.momentum = None
        m.train()
    device = model_device(model)
    for x, *_ in DataLoader(dataset, batch_size=batch_size):
        model(x.to(device))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.train(was_training)


def bn_statistics(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every BatchNorm's running mean and variance (what a task with its own statistics ships)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out[f'{name}.running_mean'], out[f'{name}.running_var'] = m.running_mean, m.running_var
    return out


def safetensors_bytes(tensors: Dict[str, torch.Tensor]) -> int:
    """Size of the safetensors file holding `tensors` (header included)."""
    from safetensors.torch import save
    return len(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def transfer_plain(net: nn.Module, train_set: Dataset, val_set: Dataset, mode: str, head: str,
                   **fit_kwargs) -> dict:
    """Train a plain network (`net(x)`, a head for the new task in place) in `mode` ('lora': what requires grad
    already, as `add_lora` left it; 'linear': the head only; 'full': everything) through `fit_tasks`, with
    fit_tasks' 'cycle' sampling as a transfer over a bank has.

    Returns {'top1' (on `val_set`), 'trainable', 'history'}.
    """
    if mode not in PLAIN_MODES:
        raise ValueError(f'unknown plain mode {mode!r}; expected one of {PLAIN_MODES}')
    if mode != 'lora':
        head_params = {id(p) for p in net.get_submodule(head).parameters()}
        for p in net.parameters():
            p.requires_grad_(mode == 'full' or id(p) in head_params)
    trainable = trainable_count(net)
    reestimate_bn(net, train_set)
    frozen_stats = mode == 'linear'  # a head alone changes no activation
    history = fit_tasks(net, {None: train_set}, {None: val_set}, frozen_stats=frozen_stats, sampling='cycle',
                        **fit_kwargs)
    if not frozen_stats:
        reestimate_bn(net, train_set)
    return {'top1': evaluate(net, None, val_set), 'trainable': trainable, 'history': history}
