"""Unsupervised multi-source domain adaptation by learning only a new mixture over a frozen bank.

In `adapt_target`, labelled sources are tasks of a
trained `MultiTaskIsoMix` sharing one head; the unlabelled target is a new task whose mixture starts
at the mean of the sources' logits and whose head is the sources' head. Only the target's mixture
logits are trained (bank, stem, heads and the sources are frozen); its statistics are re-estimated on
target data (AdaBN). The objective, on a target batch x_t and one batch x_s per source s:

    L = mean_i H(p(y | x_t,i)) - H(mean_i p(y | x_t,i))                (information maximization)
        + moment_weight * sum_s sum_{k=1,2} || E[f_t^k] - E[f_s^k] ||_2   (M3SDA moment matching)

where f are the pooled features before the head (sources through their own frozen paths, in eval
mode): the first term makes confident target predictions, the second keeps them spread over the
classes (no collapse), the third aligns the first and second moments of the target's late features
with every source's (Peng et al., "Moment Matching for Multi-Source Domain Adaptation", ICCV 2019).
"""
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from ..models.multitask import MultiTaskIsoMix
from .transfer import batch_images, reestimate_stats

__all__ = ['adaptation_loss', 'adapt_target']


def _moments(f: torch.Tensor) -> List[torch.Tensor]:
    return [f.mean(0), (f * f).mean(0)]


def adaptation_loss(
        probs: torch.Tensor,
        target_features: torch.Tensor,
        source_features: Sequence[torch.Tensor],
        moment_weight: float = 1.0,
) -> Dict[str, torch.Tensor]:
    """The documented unsupervised objective (module docstring): entropy - diversity + moment distance."""
    eps = 1e-8
    entropy = -(probs * (probs + eps).log()).sum(-1).mean()
    mean = probs.mean(0)
    diversity = -(mean * (mean + eps).log()).sum()
    moments = sum((mt - ms).norm() for fs in source_features
                  for mt, ms in zip(_moments(target_features), _moments(fs))) if source_features else probs.new_zeros(())
    return {'loss': entropy - diversity + moment_weight * moments, 'entropy': entropy, 'diversity': diversity,
            'moments': moments}


def adapt_target(
        model: MultiTaskIsoMix,
        target: str,
        target_data: Dataset,
        source_data: Optional[Dict[str, Dataset]] = None,
        steps: int = 200,
        lr: float = 0.05,
        batch_size: int = 128,
        moment_weight: float = 1.0,
        device: Union[str, torch.device] = 'cpu',
        seed: int = 0,
        log_every: int = 0,
) -> List[dict]:
    """Adapt the unlabelled `target` task by training only its own mixture logits (see the module docstring).

    Statistics of the target are re-estimated on `target_data` first and keep following it during
    adaptation. `source_data` (task name -> labelled or unlabelled images) enables moment matching.
    Returns the loss terms every `log_every` steps (and at the end).
    """
    if target_data is None or len(target_data) == 0:
        raise ValueError(f'adapting task {target!r} needs unlabelled target data; got an empty dataset')
    path = model._path(target)
    source_data = source_data or {}
    for s, ds in source_data.items():
        model._path(s)
        if s == target:
            raise ValueError(f'task {target!r} cannot be its own source')
        if len(ds) == 0:
            raise ValueError(f'source task {s!r} has an empty dataset')
    logits = [sch.mixture.logits for sch in path.schedules if sch.mixture is not model.shared_mixture]
    if not logits:
        raise ValueError(f'task {target!r} owns no mixture logits (all layers use the shared mixture)')
    for p in model.parameters():
        p.requires_grad_(False)
    for p in logits:
        p.requires_grad_(True)
    reestimate_stats(model, target, target_data, device=device)
    optimizer = torch.optim.Adam(logits, lr=lr)
    g = torch.Generator().manual_seed(seed)

    def cycle(ds):
        while True:
            yield from DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=len(ds) > batch_size, generator=g)
    t_iter = cycle(target_data)
    s_iters = {s: cycle(ds) for s, ds in source_data.items()}
    history = []
    model.eval()
    path.train()  # target statistics follow target batches; sources and head stay in eval mode
    try:
        for step in range(1, steps + 1):
            x_t = batch_images(next(t_iter)).to(device)
            with torch.no_grad():
                source_features = [model.forward_head(model.forward_features(batch_images(next(it)).to(device), s), s,
                                                      pre_logits=True) for s, it in s_iters.items()]
            feats = model.forward_head(model.forward_features(x_t, target), target, pre_logits=True)
            probs = path.head(feats).softmax(-1)
            terms = adaptation_loss(probs, feats, source_features, moment_weight)
            optimizer.zero_grad(set_to_none=True)
            terms['loss'].backward()
            optimizer.step()
            if (log_every and step % log_every == 0) or step == steps:
                history.append({'step': step, **{k: round(v.item(), 4) for k, v in terms.items()}})
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    return history
