"""Mixture figures: alpha heatmaps (layer x template) and per-layer sharing between tasks.

Row l of a heatmap shows how executed layer l draws on the K templates of its bank; a hard order is
one-hot rows. Sharing is measured per executed layer as the mean pairwise Jensen-Shannon divergence
(base 2, so in [0, 1]) between the tasks' alpha_l: 0 when every task mixes the templates the same way
at that layer, 1 when tasks use disjoint templates.
"""
import io
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .files import atomic_write_bytes

__all__ = ['plot_mixtures', 'js_divergence', 'js_sharing', 'plot_task_mixtures', 'plot_sharing']


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the mixture figures need matplotlib: pip install 'timm-isomix[plot]'") from e
    matplotlib.use('Agg')  # files only: training runs on servers without a display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Union[str, Path], **kwargs) -> str:
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format='png', **kwargs)
    finally:
        plt.close(fig)
    atomic_write_bytes(buf.getvalue(), str(path))
    return str(path)


def plot_mixtures(alphas: Dict[str, torch.Tensor], path: str, title: Optional[str] = None) -> str:
    """Write a PNG heatmap of mixture weights, one panel per mixture; return the path.

    Args:
        alphas: mixture name -> alpha (L, K) (e.g. `{n: m.alpha() for n, m in model.mixtures().items()}`).
        path: PNG file to write, atomically.
        title: figure title (e.g. the epoch).
    """
    if not alphas:
        raise ValueError('plot_mixtures needs at least one mixture')
    for name, a in alphas.items():
        if a.dim() != 2:
            raise ValueError(f'alpha of mixture {name!r} must be (layers, templates), got shape {tuple(a.shape)}')
    plt = _pyplot()
    names = list(alphas)
    fig, axes = plt.subplots(
        1, len(names), figsize=(1.8 + 1.6 * len(names) + 0.25 * sum(a.shape[1] for a in alphas.values()), 4.2),
        squeeze=False)
    image = None
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        a = alphas[name].detach().float().cpu()
        image = ax.imshow(a.numpy(), vmin=0., vmax=1., cmap='viridis', aspect='auto', interpolation='nearest')
        ax.set_title(name, fontsize=9)
        ax.set_xlabel('template')
        if i == 0:  # one label for the row of panels: they share the axis meaning
            ax.set_ylabel('layer')
        ax.set_xticks(range(a.shape[1]))
        ax.set_yticks(range(a.shape[0]))
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.04, pad=0.02, label='alpha')
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi=100)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits between distributions along the last dim (rows of p and q)."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a, b):  # 0 * log 0 = 0
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log2() - b.clamp_min(1e-300).log2()), torch.zeros_like(a)).sum(-1)
    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(0, 1).float()


def js_sharing(alphas: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Per layer, the mean pairwise Jensen-Shannon divergence between the tasks' alphas (L,); zeros for one task."""
    names = list(alphas)
    shapes = {tuple(a.shape) for a in alphas.values()}
    if len(shapes) != 1:
        raise ValueError(f'tasks have mixtures of different shapes {shapes}; sharing is measured layer by layer')
    num_layers = next(iter(shapes))[0]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    if not pairs:
        return torch.zeros(num_layers)
    return torch.stack([js_divergence(alphas[a], alphas[b]) for a, b in pairs]).mean(0)


def plot_task_mixtures(alphas: Dict[str, torch.Tensor], path: Union[str, Path], title: str = '') -> Path:
    """One heatmap per task (layers x templates, colour = alpha, values printed), side by side, as a PNG."""
    plt = _pyplot()
    n = len(alphas)
    fig, axes = plt.subplots(1, n, figsize=(1.2 + 2.2 * n, 3.6), squeeze=False, sharey=True)
    im = None
    for ax, (name, a) in zip(axes[0], alphas.items()):
        a = a.detach().float().cpu()
        im = ax.imshow(a.numpy(), vmin=0, vmax=1, cmap='viridis', aspect='auto')
        ax.set_title(name)
        ax.set_xlabel('template')
        ax.set_xticks(range(a.shape[1]))
        for l in range(a.shape[0]):
            for k in range(a.shape[1]):
                ax.text(k, l, f'{a[l, k]:.2f}', ha='center', va='center', fontsize=6,
                        color='black' if a[l, k] > 0.5 else 'white')
    axes[0][0].set_ylabel('layer')
    fig.colorbar(im, ax=axes[0].tolist(), label='alpha')
    if title:
        fig.suptitle(title)
    return Path(_save(fig, path, dpi=120, bbox_inches='tight'))


def plot_sharing(alphas: Dict[str, torch.Tensor], path: Union[str, Path], title: str = '') -> Path:
    """Bar chart of the per-layer mean pairwise Jensen-Shannon divergence between tasks (0 = shared)."""
    plt = _pyplot()
    js = js_sharing(alphas)
    fig, ax = plt.subplots(figsize=(1.5 + 0.4 * len(js), 3))
    bars = ax.bar(range(len(js)), js.numpy())
    ax.bar_label(bars, labels=[f'{v:.3f}' for v in js.tolist()], fontsize=6)
    ax.set_ylim(0, min(1., max(0.05, 1.25 * js.max().item())))  # small divergences stay visible
    ax.set_xlabel('layer')
    ax.set_ylabel('mean pairwise JS (bits)')
    ax.set_title(title or f'task sharing per layer ({", ".join(alphas)})')
    return Path(_save(fig, path, dpi=120, bbox_inches='tight'))
