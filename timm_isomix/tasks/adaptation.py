"""Unsupervised multi-source domain adaptation by learning only a new mixture over a frozen bank.

Labelled sources are tasks of a trained `MultiTaskIsoMix` sharing one head; the unlabelled target is a
new task whose mixture starts at the mean of the sources' logits and whose head is the sources' head.
`adapt_target` trains only the target's own mixture logits (bank, stem, heads and sources frozen), on a
target batch x_t and one batch x_s per source s per step, minimising

    L = im_weight * [ mean_i H(p(y | x_t,i)) - H(mean_i p(y | x_t,i)) ]     (information maximisation)
        + align_weight * D(f_t, {f_s})                                       (feature alignment)

where f are the pooled features before the head (sources through their own frozen paths, in eval
mode). The first term makes confident target predictions that stay spread over the classes; the
alignment D is one of `ALIGNMENTS`:

  'mm'           moment matching as in the authors' code (loop-project, lib/moment_matching_da.py):
                 1/2 ||E f_t - E f_s||^2 + 1/2 ||E f_t^2 - E f_s^2||^2, averaged over sources; weight 5e-4;
  'mm_balanced'  the same moments of features standardised by the sources' mean and spread, averaged (not
                 summed) over features: unit-free, so a weight near 1 balances it with the IM term;
  'adversarial'  a domain discriminator on the features (source 0, target 1, binary cross-entropy, trained
                 in the same step); the target mixture learns to make it answer "source" (the authors'
                 lib/adversarial_da.py, on pooled features instead of the last block's map);
  'swd'          sliced Wasserstein distance: mean squared difference of the sorted projections of f_t and
                 f_s on random unit directions (fresh each step), averaged over sources.

Statistics (`stats`): 'adabn' re-estimates the target's BatchNorm statistics on target images before
adapting, lets them follow target batches while adapting and re-estimates them at the end; 'source'
keeps the statistics the target was given (the first source's) throughout.

Choosing hyperparameters without target labels (`select_candidate`): each candidate's score is the
information-maximisation term on held-out unlabelled target images (lower: more confident, still
diverse predictions; entropy-based validation as in Morerio et al., ICLR 2018); candidates whose objective
did not decrease over the run are passed over when any other did. Labels are used only to report accuracy.
"""
import math
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..models.multitask import MultiTaskIsoMix
from .fit import model_device
from .transfer import batch_images, reestimate_stats

__all__ = ['ALIGNMENTS', 'DEFAULT_ALIGN_WEIGHT', 'information_maximization', 'moment_distance',
           'sliced_wasserstein', 'DomainDiscriminator', 'adaptation_loss', 'adapt_target', 'label_free_score',
           'loss_decreased', 'select_candidate']

ALIGNMENTS = ('none', 'mm', 'mm_balanced', 'adversarial', 'swd')
# Starting weights: the authors' hard-coded moment-matching weight; 1 for the scale-free ones.
DEFAULT_ALIGN_WEIGHT = {'none': 0., 'mm': 5e-4, 'mm_balanced': 1., 'adversarial': 1., 'swd': 1.}
EPS = 1e-8


def information_maximization(probs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Mean prediction entropy, entropy of the mean prediction, and im = entropy - diversity (nats)."""
    entropy = -(probs * (probs + EPS).log()).sum(-1).mean()
    mean = probs.mean(0)
    diversity = -(mean * (mean + EPS).log()).sum()
    return {'im': entropy - diversity, 'entropy': entropy, 'diversity': diversity}


def moment_distance(target: torch.Tensor, sources: Sequence[torch.Tensor], balanced: bool = False) -> torch.Tensor:
    """First and second moment distance of (N, C) features to each source, averaged over sources.

    balanced=False: the authors' 1/2 squared L2 norms, summed over features. balanced=True: features
    standardised by the pooled sources' per-feature mean and std (no gradient), squared differences
    averaged over features.
    """
    if not sources:
        return target.new_zeros(())
    if balanced:
        pooled = torch.cat(list(sources)).detach()
        mu, sd = pooled.mean(0), pooled.std(0) + 1e-4
        target, sources = (target - mu) / sd, [(s - mu) / sd for s in sources]
    reduce = torch.mean if balanced else (lambda d: 0.5 * d.sum())
    total = target.new_zeros(())
    for s in sources:
        total = total + reduce((target.mean(0) - s.mean(0)) ** 2) + reduce(((target ** 2).mean(0) - (s ** 2).mean(0)) ** 2)
    return total / len(sources)


def sliced_wasserstein(target: torch.Tensor, sources: Sequence[torch.Tensor], num_projections: int = 128,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Squared sliced Wasserstein-2 distance between (N, C) feature batches, averaged over sources.

    Batches of different sizes are compared on their first min(N_t, N_s) samples.
    """
    if not sources:
        return target.new_zeros(())
    dirs = torch.randn(target.shape[1], num_projections, generator=generator).to(target)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    total = target.new_zeros(())
    for s in sources:
        n = min(len(target), len(s))
        pt, _ = (target[:n] @ dirs).sort(0)
        ps, _ = (s[:n].detach() @ dirs).sort(0)
        total = total + ((pt - ps) ** 2).mean()
    return total / len(sources)


class DomainDiscriminator(nn.Module):
    """A small MLP telling source features (0) from target features (1)."""

    def __init__(self, num_features: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.LeakyReLU(0.2), nn.Dropout(0.3),
                                 nn.Linear(hidden, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f).squeeze(-1)


def adaptation_loss(
        probs: torch.Tensor,
        target_features: torch.Tensor,
        source_features: Sequence[torch.Tensor],
        align: str = 'mm',
        align_weight: Optional[float] = None,
        im_weight: float = 1.0,
        discriminator: Optional[DomainDiscriminator] = None,
        generator: Optional[torch.Generator] = None,
) -> Dict[str, torch.Tensor]:
    """The target's objective (module docstring): {'loss', 'im', 'entropy', 'diversity', 'align'}."""
    if align not in ALIGNMENTS:
        raise ValueError(f'unknown alignment {align!r}; expected one of {ALIGNMENTS}')
    weight = DEFAULT_ALIGN_WEIGHT[align] if align_weight is None else align_weight
    terms = information_maximization(probs)
    if align in ('mm', 'mm_balanced'):
        d = moment_distance(target_features, source_features, balanced=align == 'mm_balanced')
    elif align == 'swd':
        d = sliced_wasserstein(target_features, source_features, generator=generator)
    elif align == 'adversarial':
        if discriminator is None:
            raise ValueError("align='adversarial' needs a DomainDiscriminator")
        logits = discriminator(target_features)
        d = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))  # look like a source
    else:
        d = probs.new_zeros(())
    return {'loss': im_weight * terms['im'] + weight * d, **terms, 'align': d}


def _discriminator_step(disc: DomainDiscriminator, opt: torch.optim.Optimizer, target: torch.Tensor,
                        sources: Sequence[torch.Tensor]) -> float:
    """One update of the discriminator: 1/2 (BCE on sources as 0 + BCE on the target as 1)."""
    src = torch.cat(list(sources)).detach()
    ls, lt = disc(src), disc(target.detach())
    loss = 0.5 * (F.binary_cross_entropy_with_logits(ls, torch.zeros_like(ls)) +
                  F.binary_cross_entropy_with_logits(lt, torch.ones_like(lt)))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _prepare(model: MultiTaskIsoMix, target: str, target_data: Dataset, source_data: Dict[str, Dataset],
             stats: str) -> List[nn.Parameter]:
    """Check the inputs, freeze everything but the target's own logits, and return those."""
    if target_data is None or len(target_data) == 0:
        raise ValueError(f'adapting task {target!r} needs unlabelled target data; got an empty dataset')
    if stats not in ('adabn', 'source'):
        raise ValueError(f"stats must be 'adabn' (re-estimate on the target) or 'source' (keep), got {stats!r}")
    path = model._path(target)
    for s, ds in source_data.items():
        model._path(s)
        if s == target:
            raise ValueError(f'task {target!r} cannot be its own source')
        if len(ds) == 0:
            raise ValueError(f'source task {s!r} has an empty dataset')
    logits = path.mixture_logits(model.shared_mixture)
    if not logits:
        raise ValueError(f'task {target!r} owns no mixture logits (all layers use the shared mixture)')
    for p in model.parameters():
        p.requires_grad_(False)
    for p in logits:
        p.requires_grad_(True)
    return logits


def _cycle(ds: Dataset, batch_size: int, g: torch.Generator):
    while True:
        yield from DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=len(ds) > batch_size, generator=g)


def adapt_target(
        model: MultiTaskIsoMix,
        target: str,
        target_data: Dataset,
        source_data: Optional[Dict[str, Dataset]] = None,
        steps: int = 200,
        lr: float = 0.05,
        batch_size: int = 128,
        align: str = 'mm',
        align_weight: Optional[float] = None,
        im_weight: float = 1.0,
        stats: str = 'adabn',
        device: Optional[Union[str, torch.device]] = None,
        seed: int = 0,
) -> List[dict]:
    """Adapt the unlabelled `target` task by training only its own mixture logits (module docstring).

    `source_data` (task name -> images, labels ignored) feeds the alignment. Returns the loss terms of
    every step (the curves that show whether the objective decreased). The data go to `device`, by default
    the model's.
    """
    device = model_device(model) if device is None else device
    source_data = source_data or {}
    logits = _prepare(model, target, target_data, source_data, stats)
    if align != 'none' and not source_data:
        raise ValueError(f'alignment {align!r} needs source data')
    path = model._path(target)
    if stats == 'adabn':
        reestimate_stats(model, target, target_data, device=device)
    optimizer = torch.optim.Adam(logits, lr=lr)
    g = torch.Generator().manual_seed(seed)
    disc = disc_opt = None
    if align == 'adversarial':
        torch.manual_seed(seed)
        disc = DomainDiscriminator(model.num_features).to(device)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    t_iter = _cycle(target_data, batch_size, g)
    s_iters = {s: _cycle(ds, batch_size, g) for s, ds in source_data.items()}
    history = []
    model.eval()
    path.train(stats == 'adabn')  # with AdaBN the target's statistics follow target batches
    try:
        for step in range(1, steps + 1):
            x_t = batch_images(next(t_iter)).to(device)
            with torch.no_grad():
                source_features = [model.forward_head(model.forward_features(batch_images(next(it)).to(device), s), s,
                                                      pre_logits=True) for s, it in s_iters.items()]
            feats = model.forward_head(model.forward_features(x_t, target), target, pre_logits=True)
            probs = path.head(feats).softmax(-1)
            record = {'step': step}
            if disc is not None:
                record['discriminator'] = round(_discriminator_step(disc, disc_opt, feats, source_features), 5)
            terms = adaptation_loss(probs, feats, source_features, align, align_weight, im_weight, disc, g)
            optimizer.zero_grad(set_to_none=True)
            terms['loss'].backward()
            optimizer.step()
            history.append({**record, **{k: round(v.item(), 5) for k, v in terms.items()}})
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    if stats == 'adabn':
        reestimate_stats(model, target, target_data, device=device)
    return history


@torch.no_grad()
def label_free_score(model: MultiTaskIsoMix, task: str, images: Dataset, batch_size: int = 256,
                     device: Optional[Union[str, torch.device]] = None) -> float:
    """The information-maximisation term (entropy - diversity, nats; lower is better) of `task`'s
    predictions on unlabelled `images`, in eval mode (on `device`, by default the model's): the selection score
    that never sees a label."""
    device = model_device(model) if device is None else device
    was_training = model.training
    model.eval()
    probs = torch.cat([model(batch_images(b).to(device), task=task).softmax(-1)
                       for b in DataLoader(images, batch_size=batch_size)])
    model.train(was_training)
    return information_maximization(probs)['im'].item()


def loss_decreased(history: Sequence[dict], key: str = 'loss', window: float = 0.1) -> bool:
    """Whether the mean of `key` over the last `window` of the steps is below its mean over the first."""
    values = [h[key] for h in history if key in h]
    if len(values) < 2:
        return False
    n = max(1, int(math.ceil(len(values) * window)))
    return sum(values[-n:]) / n < sum(values[:n]) / n


def select_candidate(candidates: Sequence[dict]) -> int:
    """The index of the candidate to keep: the lowest 'score' (label_free_score on held-out target images)
    among those whose objective decreased ('decreased'), or among all when none did. No label is read."""
    if not candidates:
        raise ValueError('select_candidate needs at least one candidate')
    pool = [i for i, c in enumerate(candidates) if c.get('decreased')] or list(range(len(candidates)))
    return min(pool, key=lambda i: candidates[i]['score'])
