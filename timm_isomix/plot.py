"""Mixture heatmaps: for each mixture, alpha as a (layer x template) image.

Row l shows how executed layer l draws on the K templates of its bank; a hard order is one-hot rows.
"""
import os
import tempfile
from typing import Dict, Optional

import torch

__all__ = ['plot_mixtures']


def plot_mixtures(alphas: Dict[str, torch.Tensor], path: str, title: Optional[str] = None) -> str:
    """Write a PNG heatmap of mixture weights, one panel per mixture; return the path.

    Args:
        alphas: mixture name -> alpha (L, K) (e.g. `{n: m.alpha() for n, m in model.mixtures().items()}`).
        path: PNG file to write; written atomically (temporary file in the same folder, then renamed).
        title: figure title (e.g. the epoch).
    """
    import matplotlib
    matplotlib.use('Agg')  # no display needed; also keeps training runs on servers headless
    import matplotlib.pyplot as plt

    if not alphas:
        raise ValueError('plot_mixtures needs at least one mixture')
    for name, a in alphas.items():
        if a.dim() != 2:
            raise ValueError(f'alpha of mixture {name!r} must be (layers, templates), got shape {tuple(a.shape)}')
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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.png', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            fig.savefig(f, format='png', dpi=100)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path
