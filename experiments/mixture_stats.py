"""How mixtures move during training, measured per mixture (alpha: layers x templates).

- entropy: mean over layers of H(alpha_l) in nats (ln K = uniform, 0 = one template);
- moved: mean over layers of the total-variation distance 0.5 * |alpha_l - alpha_l(start)|_1 in [0, 1];
- changed: how many layers lead with another template than at the start (argmax);
- diversity: mean pairwise Jensen-Shannon divergence (bits, in [0, 1]) between the layers' alphas:
  0 when every layer mixes the templates the same way, 1 when layers use disjoint templates.
"""
from typing import Dict

import torch

from timm_isomix.train.plots import js_divergence

__all__ = ['mixture_stats', 'alphas_of']


def alphas_of(model) -> Dict[str, torch.Tensor]:
    """alpha (L, K) of each soft mixture of an isomix model ({} for a model without soft mixtures)."""
    if not hasattr(model, 'mixtures'):
        return {}
    with torch.no_grad():
        return {n: m.alpha().detach().float().cpu() for n, m in model.mixtures().items() if not m.is_hard}


def _diversity(a: torch.Tensor) -> float:
    pairs = [(i, j) for i in range(a.shape[0]) for j in range(i + 1, a.shape[0])]
    if not pairs:
        return 0.
    return torch.stack([js_divergence(a[i], a[j]) for i, j in pairs]).mean().item()


def mixture_stats(alphas: Dict[str, torch.Tensor], start: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The four measures above, averaged over the mixtures ('changed' summed); {} without soft mixtures."""
    if not alphas:
        return {}
    entropy, moved, changed, diversity = [], [], 0, []
    for name, a in alphas.items():
        a0 = start[name]
        entropy.append((-(a * a.clamp_min(1e-12).log()).sum(-1)).clamp_min(0.).mean().item())
        moved.append((0.5 * (a - a0).abs().sum(-1)).mean().item())
        changed += int((a.argmax(-1) != a0.argmax(-1)).sum())
        diversity.append(_diversity(a))
    n = len(alphas)
    return {'entropy': sum(entropy) / n, 'moved': sum(moved) / n, 'changed': changed, 'diversity': sum(diversity) / n}
