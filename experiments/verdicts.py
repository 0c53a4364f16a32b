"""The verdict of each study: the question it asks, the verdict, and a finding whose numbers are computed
from the result files (never typed here).

A verdict is one of three words: supported, not shown at this scale, contradicted. `VERDICTS[study][scale]`
lists a study's verdicts at a scale; a scale without an entry has none yet (a study scale still running, or one
whose verdict is still to be written). `CLAIMS` names each claim in the papers' own words; every verdict
backs one claim. The reports (`report.py`), the results index and README's claims table (`index.py`) read
both from here.
"""
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

from .runner import finished_runs

__all__ = ['SUPPORTED', 'NOT_SHOWN', 'CONTRADICTED', 'CLAIMS', 'Verdict', 'VERDICTS', 'Results', 'verdicts_of']

SUPPORTED, NOT_SHOWN, CONTRADICTED = 'supported', 'not shown at this scale', 'contradicted'

_ORGANISE = 'interpretable self-organisation of the modules'
CLAIMS: Dict[str, str] = {
    'multi-task': 'competitive multi-task learning with soft weight sharing',
    'new task': 'reusing existing modules for a new task by adjusting the computation order',
    'adaptation': 'unsupervised multi-source domain adaptation by only manipulating the order of pretrained modules',
    'reuse': 'higher accuracy of existing architectures (ImageNet) at no parameter increase by reusing the same '
             'block several times',
    'organisation': f'{_ORGANISE}: one task',
    'organisation, multi-task': f'{_ORGANISE}: in multi-task learning, shared first layers and task-specific ones '
                                'near the head',
    'organisation by data': f'{_ORGANISE}: copies of one task reach the same mixtures from independent starts',
    'organisation, adaptation': f'{_ORGANISE}: in adaptation, domain-specific first layers and shared later ones',
    'routing accuracy': 'Routing Networks: per-input routing at least as accurate as soft per-task mixtures (MIN-MTL)',
    'routing cost': 'Routing Networks: "cross-stitch accuracy with 85 % less training time" at a nearly constant '
                    'per-task training cost',
}


class Results:
    """Per-seed values from the result files, read once per study and scale."""

    def __init__(self):
        self._runs: Dict[tuple, dict] = {}

    def runs(self, study: str, scale: str = 'cpu') -> Dict[str, Dict[int, dict]]:
        if (study, scale) not in self._runs:
            self._runs[study, scale] = finished_runs(study, scale)
        return self._runs[study, scale]

    def values(self, study: str, config: str, key: str = 'top1', scale: str = 'cpu') -> List:
        records = self.runs(study, scale).get(config)
        if not records:
            raise KeyError(f'{study} ({scale}) has no finished runs of {config!r}')
        return [records[s]['result'][key] for s in sorted(records)]

    def mean(self, study: str, config: str, key: str = 'top1', scale: str = 'cpu') -> float:
        return statistics.fmean(self.values(study, config, key, scale))


@dataclass(frozen=True)
class Verdict:
    claim: str        # a key of CLAIMS
    question: str
    verdict: str      # SUPPORTED, NOT_SHOWN or CONTRADICTED
    finding: str      # {name} fields are filled by `numbers`
    numbers: Callable[[Results, str], Dict[str, str]] = lambda results, scale: {}

    def sentence(self, results: Results, scale: str = 'cpu') -> str:
        return self.finding.format(**self.numbers(results, scale))


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.


def _spreads(a: Sequence[float], b: Sequence[float]) -> str:
    """Whether two configurations' mean +- std intervals overlap, in words."""
    (ma, sa), (mb, sb) = (statistics.fmean(a), _sd(a)), (statistics.fmean(b), _sd(b))
    return 'the spreads overlap' if ma - sa <= mb + sb and mb - sb <= ma + sa else 'the spreads do not overlap'


def _points(d: float, digits: int = 1) -> str:
    """A difference of top-1 means in words: '3.0 points above' / '0.2 points below'."""
    return f'{abs(d):.{digits}f} points {"above" if d >= 0 else "below"}'


def _ratio(r: 'Results', study: str, a: str, b: str, key: str, scale: str) -> float:
    return r.mean(study, a, key, scale) / r.mean(study, b, key, scale)


def _layers(results: Results, study: str, config: str, key: str, scale: str) -> List[float]:
    """Per-layer mean over seeds of a per-layer result (a JS list)."""
    per_seed = results.values(study, config, key, scale)
    return [statistics.fmean(v) for v in zip(*per_seed)]


def _halves(per_seed: List[List[float]]) -> List[float]:
    """Per seed: the first half's mean minus the second half's."""
    return [statistics.fmean(v[:len(v) // 2]) - statistics.fmean(v[len(v) // 2:]) for v in per_seed]


def _multitask(r: Results, scale: str) -> Dict[str, str]:
    s = 'multitask-digits-cifar10'
    iso, ind, shared = (r.values(s, c, scale=scale) for c in ('isomix', 'independent', 'shared_trunk'))
    return {'vs_independent': _points(statistics.fmean(iso) - statistics.fmean(ind)),
            'share': f'{100 * _ratio(r, s, "isomix", "independent", "params", scale):.0f}',
            'vs_shared': _points(statistics.fmean(iso) - statistics.fmean(shared)), 'spreads': _spreads(iso, shared),
            'patch': _points(r.mean(s, 'model_patch_lr10', scale=scale) - statistics.fmean(iso)),
            **{f'{c}_train': f'{statistics.fmean(_history(r, s, c, "mnistm_train_top1", scale)):.1f}'
               for c in ('model_patch', 'shared_trunk')}}


def _history(r: Results, study: str, config: str, key: str, scale: str) -> List[float]:
    """Per seed, a history key's mean over the run's epochs."""
    return [statistics.fmean(h[key] for h in rec['history']) for rec in r.runs(study, scale)[config].values()]


def _relative(r: Results, study: str, mode: str, scale: str) -> float:
    """Top-1 of a transfer mode as % of full fine-tuning, per seed, then the mean."""
    full = r.runs(study, scale)['full']
    runs = r.runs(study, scale)[mode]
    return statistics.fmean(100 * runs[s]['result']['top1'] / full[s]['result']['top1'] for s in runs if s in full)


def _transfer(study: str) -> Callable[[Results, str], Dict[str, str]]:
    def numbers(r: Results, scale: str) -> Dict[str, str]:
        mix, lin = r.values(study, 'mixture', scale=scale), r.values(study, 'linear', scale=scale)
        trainable = r.mean(study, 'mixture', 'trainable', scale) / r.mean(study, 'full', 'trainable', scale)
        return {'relative': f'{_relative(r, study, "mixture", scale):.0f}', 'trainable': f'{100 * trainable:.2f}',
                'vs_linear': _points(statistics.fmean(mix) - statistics.fmean(lin)), 'spreads': _spreads(mix, lin),
                'patch': f'{_relative(r, study, "patch_lr10", scale):.0f}',
                'on_patch': _points(r.mean(study, 'mixture_patch_lr10', scale=scale)
                                    - r.mean(study, 'patch_lr10', scale=scale))}
    return numbers


def _adaptation(r: Results, scale: str) -> Dict[str, str]:
    from .task_report import label_free_choice
    s = 'adaptation-mnistm'
    runs = r.runs(s, scale)
    adabn, source = r.mean(s, 'adabn', scale=scale), r.mean(s, 'source_only', scale=scale)
    on_adabn = [r.mean(s, c, scale=scale) - adabn for c in runs if c.startswith('mixture_adabn-')]
    alone = [r.mean(s, c, scale=scale) - source for c in runs if c.startswith('mixture-')]
    picked = statistics.fmean(label_free_choice(runs, 'mixture_adabn')[1]) - adabn
    return {'adabn': f'{adabn - source:+.1f}', 'lo': f'{min(on_adabn):+.1f}', 'hi': f'{max(on_adabn):+.1f}',
            'picked': f'{picked:+.1f}', 'alone': f'{max(alone, key=abs):+.1f}'}


def _adaptation_sharing(r: Results, scale: str) -> Dict[str, str]:
    s, config = 'adaptation-mnistm', 'source_only'
    js = _layers(r, s, config, 'js_sources', scale)
    halves = _halves(r.values(s, config, 'js_sources', scale))
    return {'first': f'{js[0]:.3f}', 'last': f'{js[-1]:.3f}', 'seeds': f'{sum(h > 0 for h in halves)} of {len(halves)}'}


def _reuse(study: str) -> Callable[[Results, str], Dict[str, str]]:
    """Each configuration against reuse 1: `two`, `three`, `unshared`, `hard` (and `*_spreads`, `*_macs`), for
    the configurations a scale ran (a scale may run a subset, e.g. reuse1, reuse2 and unshared-depth8)."""
    def numbers(r: Results, scale: str) -> Dict[str, str]:
        one = r.values(study, 'reuse1', scale=scale)
        out = {}
        for config, key in (('reuse2', 'two'), ('reuse3', 'three'), ('unshared-depth8', 'unshared'),
                            ('reuse2-hard-cyclic', 'hard')):
            if config not in r.runs(study, scale):
                continue
            other = r.values(study, config, scale=scale)
            out[key] = _points(statistics.fmean(other) - statistics.fmean(one), 2)
            out[key + '_spreads'] = _spreads(other, one)
            out[key + '_macs'] = f'{_ratio(r, study, config, "reuse1", "macs", scale):.0f}x'
        out['macs'] = ' and '.join(out[k + '_macs'] for k in ('two', 'three') if k + '_macs' in out)
        return out
    return numbers


def _warmstart(r: Results, scale: str) -> Dict[str, str]:
    s = 'warmstart-miniimagenet32'
    iso, res = r.values(s, 'isomix-reuse2-warm', scale=scale), r.values(s, 'resnet26-continue', scale=scale)
    epochs = next(iter(r.runs(s, scale)['isomix-reuse2-warm'].values()))['scale_fields']['epochs']
    pretrained = r.mean(s, 'resnet26-continue', 'top1_pretrained', scale)
    return {'before': _points(r.mean(s, 'isomix-reuse2-warm', 'top1_before', scale) - pretrained),
            'epochs': f'{epochs} fine-tuning epoch{"s" if epochs > 1 else ""}',
            'after': _points(statistics.fmean(iso) - statistics.fmean(res), 2), 'spreads': _spreads(iso, res),
            'time': f'{_ratio(r, s, "isomix-reuse2-warm", "resnet26-continue", "train_time", scale):.1f}',
            'pretrained': f'{pretrained:.1f}'}


def _mixtures(r: Results, scale: str) -> Dict[str, str]:
    s = 'mixtures-cifar10'
    soft = ('random-m10', 'uniform-m10', 'random-m10-t0.5')  # the starts that do not decide the outcome
    entropy = [r.mean(s, c, 'entropy', scale) for c in soft]
    changed = [r.mean(s, c, 'changed', scale) for c in soft]
    cyclic = [r.mean(s, c, 'changed', scale) for c in ('cyclic4-m10', 'cyclic16-m10')]
    configs = list(r.runs(s, scale))
    top1 = [r.mean(s, c, scale=scale) for c in configs]
    layers = len(next(iter(r.values(s, 'random-m10', 'alphas', scale)[0].values())))
    return {'changed': f'{min(changed):.0f}-{max(changed):.0f} of {layers}',
            'cyclic': 'no layer changes' if max(cyclic) == 0 else f'at most {max(cyclic):.1f} layers change',
            'entropy': f'{min(entropy):.2f}-{max(entropy):.2f}',
            'diversity': f'{max(r.mean(s, c, "diversity", scale) for c in soft):.2f}',
            'top1': f'{min(top1):.1f}-{max(top1):.1f}',
            'sd': f'{max(_sd(r.values(s, c, scale=scale)) for c in configs):.1f}'}


def _control(study: str) -> Callable[[Results, str], Dict[str, str]]:
    def numbers(r: Results, scale: str) -> Dict[str, str]:
        same = _layers(r, study, 'isomix', 'js_same_data', scale)
        cross = _layers(r, study, 'isomix', 'js_cross_data', scale)
        pairs = zip(r.values(study, 'isomix', 'js_cross_data', scale), r.values(study, 'isomix', 'js_same_data', scale))
        per_seed = [[c - s for c, s in zip(cs, ss)] for cs, ss in pairs]
        halves = _halves(per_seed)
        return {'same_first': f'{same[0]:.3f}', 'same_last': f'{same[-1]:.3f}', 'cross_first': f'{cross[0]:.3f}',
                'cross_last': f'{cross[-1]:.3f}', 'seeds': f'{sum(h > 0 for h in halves)} of {len(halves)}'}
    return numbers


def _routing(r: Results, scale: str) -> Dict[str, str]:
    s = 'routing-min-mtl'
    soft = r.values(s, 'isomix', scale=scale)
    inputs = max(('route_input_gumbel', 'route_input_reinforce'), key=lambda c: r.mean(s, c, scale=scale))
    routers = [c for c in r.runs(s, scale) if c.startswith('route_')]
    hard = r.values(s, 'hard_shared', scale=scale)
    within = sum(_spreads(r.values(s, c, scale=scale), hard) == 'the spreads overlap' for c in routers)
    entropy = {c: [statistics.fmean(rec['result']['train_route_entropy']) for rec in r.runs(s, scale)[c].values()
                   if 'train_route_entropy' in rec['result']] for c in ('route_task_wpl', 'route_task_reinforce')}
    return {'gap': _points(r.mean(s, inputs, scale=scale) - statistics.fmean(soft)),
            'spreads': _spreads(r.values(s, inputs, scale=scale), soft), 'within': f'{within} of {len(routers)}',
            'hard': f'{statistics.fmean(hard):.1f}',
            **{c: f'{statistics.fmean(h):.2f}' for c, h in entropy.items()},
            'recorded': f'{min(len(h) for h in entropy.values())}',
            'gumbel': f'{max(max(v) for v in r.values(s, "route_input_gumbel", "js_per_layer", scale)):.3f}'}


def _cross_stitch(r: Results, scale: str) -> Dict[str, str]:
    s = 'routing-min-mtl'
    routers = [c for c in r.runs(s, scale) if c.startswith('route_')]
    per_task = [r.mean(s, c, 'train_time_per_task', scale) for c in r.runs(s, scale)]
    return {'best': f'{max(r.mean(s, c, scale=scale) for c in routers):.1f}',
            'independent': f'{r.mean(s, "independent", scale=scale):.1f}',
            'time': f'{min(per_task):.0f}-{max(per_task):.0f}'}


def _routing_digits(r: Results, scale: str) -> Dict[str, str]:
    s, controls = 'routing-digits-cifar10', 'multitask-digits-cifar10'
    best = max(r.mean(s, c, scale=scale) for c in r.runs(s, scale))
    return {'gap': _points(r.mean(controls, 'isomix', scale=scale) - best),
            'vs_hard': _points(best - r.mean(controls, 'hard_shared', scale=scale))}


def _scaling(r: Results, scale: str) -> Dict[str, str]:
    s = 'routing-scaling'
    runs = r.runs(s, scale)
    out = {}
    for method in ('route_task_wpl', 'isomix', 'independent'):
        counts = sorted(int(c.rsplit('_T', 1)[1]) for c in runs if c.rsplit('_T', 1)[0] == method)
        first, last = (r.mean(s, f'{method}_T{n}', 'train_time_per_task', scale) for n in (counts[0], counts[-1]))
        out[method] = f'{first:.1f} -> {last:.1f}'
        out['tasks'] = f'{counts[0]} to {counts[-1]}'
    return out


_REUSE_Q = ('At a fixed parameter count, does running each template twice (reuse 2) beat running it once by at '
            'least 1.0 top-1, with spreads apart?')
_REUSE_F = ('Reuse 2 is {two} reuse 1 ({two_spreads}) and reuse 3 {three} ({three_spreads}), at {macs} the MACs. '
            'The unshared depth-8 net (twice the parameters) is {unshared} reuse 1 ({unshared_spreads}), and the '
            'same bank in the hard cyclic order, without mixing, {hard} ({hard_spreads}).')
_REUSE_FULL_F = ('With the full training and validation sets and 15 epochs, reuse 2 is {two} reuse 1 ({two_spreads}) '
                 'at {two_macs} the MACs and the same parameters; the unshared depth-8 net, with twice the '
                 'parameters and reuse 2\'s MACs, is {unshared} reuse 1 ({unshared_spreads}).')
_TRANSFER_Q = ('Does a new task learned as a new mixture over the frozen bank reach 95 % of full fine-tuning with '
               'under 1 % of the parameters trainable?')
_TRANSFER_F = ('The mixture reaches {relative} % of full fine-tuning with {trainable} % of its parameters trainable, '
               '{vs_linear} a linear probe on the same re-estimated statistics ({spreads}). Only the model patch '
               'moves accuracy ({patch} % of full fine-tuning with the patch at the mixture\'s 10x learning rate), '
               'and the mixture on top of it is {on_patch} the patch alone.')
_CONTROL_Q = ('Do tasks share the first layers and specialise near the head (the paper\'s multi-task pattern), '
              'beyond the drift between two copies of one task?')
_CONTROL_F = ('The divergence between copies of one task grows with depth ({same_first} -> {same_last} bits) as the '
              'divergence between different tasks does ({cross_first} -> {cross_last}); what the data accounts for '
              '(between tasks minus between copies) is larger in the first half of the layers than in the second '
              'in {seeds} seeds. The rise with depth is drift.')
_DATA_Q = ('Do copies of one task reach the same mixtures from independent random starts, while different tasks '
           'do not (organisation by the data)?')
_DATA_F = ('In the first layer, copies of one task differ by {same_first} bits (Jensen-Shannon) and different tasks '
           'by {cross_first} bits: the mixtures organise by the data, not by where they started.')
_WARM_Q = ('Does the staged ResNet warm-started at twice its executed depth (reuse 2, the same parameters) beat '
           'continuing the ResNet for the same fine-tuning?')
_WARM_F = ('Right after the warm start the deeper network is {before} the ResNet; after {epochs} it is {after} '
           'continuing the ResNet ({spreads}), at {time}x the training time. The ResNet itself is far from '
           'converged ({pretrained} % top-1 after its pretraining).')

VERDICTS: Dict[str, Dict[str, List[Verdict]]] = {
    'multitask-digits-cifar10': {'cpu': [Verdict(
        'multi-task', 'Do tasks that share one bank, each with its own mixture, statistics and head, reach the '
        'accuracy of independent networks (within 1 point, at <= 35 % of their parameters)?', SUPPORTED,
        'The per-task mixtures are {vs_independent} independent networks with {share} % of their parameters, and '
        '{vs_shared} a shared trunk with per-task statistics ({spreads}). They are not the most accurate per-task '
        'parameters here: the model patch at the same learning-rate multiplier is {patch} them. At the base '
        'learning rate the patch underfits (MNIST-M\'s training top-1 over the run: {model_patch_train} against the '
        'shared trunk\'s {shared_trunk_train}).', _multitask)]},
    'transfer-mnistm': {'cpu': [Verdict('new task', _TRANSFER_Q, NOT_SHOWN, _TRANSFER_F,
                                        _transfer('transfer-mnistm'))]},
    'transfer-cifar10': {'cpu': [Verdict('new task', _TRANSFER_Q, NOT_SHOWN, _TRANSFER_F,
                                         _transfer('transfer-cifar10'))]},
    'adaptation-mnistm': {'cpu': [
        Verdict('adaptation', 'Does adapting only the target\'s mixture to unlabelled target images raise accuracy '
                'beyond source-only and beyond AdaBN (statistics re-estimated on the target)?', NOT_SHOWN,
                'The gain over source-only ({adabn} points) is AdaBN\'s. Adapting the mixture on top of AdaBN changes '
                'accuracy by {lo} to {hi} points across the alignments ({picked} with the alignment the label-free '
                'rule picks), and without AdaBN by at most {alone} points.', _adaptation),
        Verdict('organisation, adaptation', 'Do the source domains use different first layers and share the later '
                'ones (the paper\'s adaptation pattern)?', SUPPORTED,
                'The sources\' mixtures (MNIST against USPS, from independent starts) differ by {first} bits '
                '(Jensen-Shannon) in the first layer and by {last} in the last; the first half of the layers '
                'diverges more than the second in {seeds} seeds.', _adaptation_sharing)]},
    'reuse-miniimagenet32': {'cpu': [Verdict('reuse', _REUSE_Q, NOT_SHOWN, _REUSE_F, _reuse('reuse-miniimagenet32'))]},
    'reuse-cifar10': {'cpu': [Verdict('reuse', _REUSE_Q, NOT_SHOWN, _REUSE_F, _reuse('reuse-cifar10'))],
                      'epochs15-train_limitall-val_limitall': [
                          Verdict('reuse', _REUSE_Q, SUPPORTED, _REUSE_FULL_F, _reuse('reuse-cifar10'))]},
    'warmstart-miniimagenet32': {scale: [Verdict('reuse', _WARM_Q, NOT_SHOWN, _WARM_F, _warmstart)]
                                 for scale in ('cpu', 'epochs3')},
    'mixtures-cifar10': {'cpu': [Verdict(
        'organisation', 'Do one task\'s mixtures organise into a distinct, interpretable schedule (which template '
        'runs where), and does that bring accuracy?', NOT_SHOWN,
        'From starts that do not decide the outcome the mixtures move ({changed} layers change their leading '
        'template) but stay soft (mean entropy {entropy} nats; ln 4 is uniform) and close to one shared mixture '
        '(layer diversity at most {diversity} bits), not a distinct schedule; cyclic starts keep their order '
        '({cyclic}). Accuracy does not depend on the start, the multiplier or the '
        'temperature: the means span {top1}, within seed spreads of up to {sd}.', _mixtures)]},
    'sharing-control-digits-cifar10': {'cpu': [
        Verdict('organisation, multi-task', _CONTROL_Q, CONTRADICTED, _CONTROL_F,
                _control('sharing-control-digits-cifar10')),
        Verdict('organisation by data', _DATA_Q, SUPPORTED, _DATA_F,
                _control('sharing-control-digits-cifar10'))]},
    'sharing-control-min-mtl': {'cpu': [
        Verdict('organisation, multi-task', _CONTROL_Q, CONTRADICTED, _CONTROL_F,
                _control('sharing-control-min-mtl')),
        Verdict('organisation by data', _DATA_Q, SUPPORTED, _DATA_F, _control('sharing-control-min-mtl'))]},
    'routing-min-mtl': {'cpu': [
        Verdict('routing accuracy', 'Is per-input routing at least as accurate as soft per-task mixtures on MIN-MTL, '
                'with the same template parameters?', CONTRADICTED,
                'The better per-input router is {gap} the soft per-task mixtures ({spreads}), and {within} routers '
                'are within the spread of the hard-shared trunk ({hard}). The per-task routers\' training routes stay '
                'near uniform (mean entropy {route_task_wpl} nats per layer for WPL, {route_task_reinforce} for '
                'REINFORCE, in the {recorded} seeds that record it; ln 4 is uniform), and per-input Gumbel routing '
                'sends every task along the same route in eval (Jensen-Shannon between tasks at most {gumbel} bits).',
                _routing),
        Verdict('routing cost', 'Do routers reach cross-stitch accuracy with 85 % less training time?', NOT_SHOWN,
                'No router reaches the independent networks, which stand in for cross-stitch here (best router '
                '{best}, independent networks {independent}); every method trains in about the same time per task '
                '({time} s). There is no cross-stitch network in this project.', _cross_stitch)]},
    'routing-digits-cifar10': {'cpu': [Verdict(
        'routing accuracy', 'Do routers over the multi-task study\'s bank reach its soft per-task mixtures on the '
        'digits and CIFAR-10, at the same steps?', CONTRADICTED,
        'The soft per-task mixtures (multitask-digits-cifar10\'s runs: the same trunk, data, steps and seeds) are '
        '{gap} the best router, and the best router is {vs_hard} the hard-shared trunk.', _routing_digits)]},
    'routing-scaling': {'cpu': [Verdict(
        'routing cost', 'Does the per-task training cost stay nearly constant as tasks are added, as the paper '
        'finds against cross-stitch networks?', NOT_SHOWN,
        'Seconds per task from {tasks} tasks: per-task routing (WPL) {route_task_wpl}, soft per-task mixtures '
        '{isomix}, independent networks {independent}. Every method runs one batch per task per step, so none grows '
        'faster than linearly in the tasks; the paper\'s contrast is with cross-stitch networks, which this project '
        'does not have.', _scaling)]},
}


def verdicts_of(study: str, scale: str = 'cpu') -> List[Verdict]:
    """A study's verdicts at a scale ([] when none is recorded)."""
    return VERDICTS.get(study, {}).get(scale, [])
