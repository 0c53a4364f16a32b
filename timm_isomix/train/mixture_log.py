"""What training reports about the mixtures: per layer the leading template and the entropy of alpha,
and a heatmap (`mixtures.png`) next to the checkpoints."""
import logging
import math
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .plots import plot_mixtures

__all__ = ['mixture_alphas', 'mixture_report', 'log_mixtures', 'write_mixture_heatmap']

_logger = logging.getLogger('train')


def mixture_alphas(model: nn.Module) -> Dict[str, torch.Tensor]:
    """alpha (L, K) of every mixture of an isomix model; {} for other models."""
    if not hasattr(model, 'mixtures'):
        return {}
    with torch.no_grad():
        return {name: m.alpha().detach().float().cpu() for name, m in model.mixtures().items()}


def mixture_report(model: nn.Module) -> List[str]:
    """One line per mixture: the argmax order and each layer's entropy of alpha (nats; ln K = uniform)."""
    lines = []
    for name, a in mixture_alphas(model).items():
        entropy = (-(a * a.clamp_min(1e-12).log()).sum(-1)).clamp_min(0.)  # no '-0.000' for one-hot rows
        lines.append(
            f'{name}: order {a.argmax(-1).tolist()} entropy [{" ".join(f"{h:.3f}" for h in entropy.tolist())}] '
            f'(uniform = {math.log(a.shape[1]):.3f})')
    return lines


def log_mixtures(model: nn.Module, epoch: int, logger: logging.Logger = _logger) -> None:
    for line in mixture_report(model):
        logger.info(f'Mixtures (epoch {epoch}) {line}')


def write_mixture_heatmap(model: nn.Module, folder: str, epoch: int) -> Optional[str]:
    """Write `<folder>/mixtures.png` (layer x template per mixture); None for models without mixtures."""
    alphas = mixture_alphas(model)
    if not alphas:
        return None
    return plot_mixtures(alphas, os.path.join(folder, 'mixtures.png'), title=f'mixtures after epoch {epoch}')


