"""How tasks use the shared bank: alpha heatmaps per task x layer x template, and per-layer sharing.

Sharing is measured per executed layer as the mean pairwise Jensen-Shannon divergence (base 2,
so in [0, 1]) between the tasks' mixture weights alpha_l: 0 when every task mixes the templates
the same way at that layer, 1 when tasks use disjoint templates.
"""
from pathlib import Path
from typing import Dict, Union

import torch

__all__ = ['js_divergence', 'js_sharing', 'plot_task_mixtures', 'plot_sharing']


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


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_task_mixtures(alphas: Dict[str, torch.Tensor], path: Union[str, Path], title: str = '') -> Path:
    """One heatmap per task (layers x templates, colour = alpha), side by side, written as a PNG."""
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
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)
    return path


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
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)
    return path
