"""What the multi-task, transfer, adaptation and routing studies add to the runner's report: sharing between
tasks per layer, loss curves, and the label-free choice across alignments, all over seeds.

    python -m experiments.task_report STUDY [--scale cpu]

writes `sharing.md` (+ `sharing.png`, `sharing-pairs.png`, `adaptation-curves.png` where they apply) beside
the runner's `report.md`:
- per configuration, the per-layer Jensen-Shannon divergence between tasks' mixtures (bits; 0 = the same
  mixture) as mean +- std over seeds, its mean over the first and the second half of the layers, and in how
  many seeds the second half diverges more than the first (the multi-task pattern: share early, specialise
  late; the adaptation pattern is the opposite); for the sharing controls, also between copies of one task
  (`js_same_data`), between different tasks (`js_cross_data`) and their difference (`js_data_excess`: the
  divergence the data, rather than drift from independent starts, accounts for) and every task's mixture in
  the first seed;
- routed configurations (Routing Networks): each task's route frequencies per layer and template (first seed);
- a heatmap of layer x task pair divergence, averaged over seeds (alpha itself is not averaged over seeds:
  templates have no identity across seeds that start from independent random mixtures);
- transfer: each mode's accuracy relative to full fine-tuning (per seed, then mean +- std);
- adaptation: the chosen candidate's objective per step (mean over seeds), the weights chosen, and, per
  condition, the alignment the same label-free rule picks across alignments for each seed.
"""
import argparse
import statistics
import sys
from typing import Any, Dict, List, Optional

import torch

from timm_isomix.tasks.adaptation import select_candidate
from timm_isomix.train.files import atomic_write_bytes
from timm_isomix.train.plots import _pyplot, _save, js_divergence, plot_task_mixtures
from .runner import STUDIES, finished_runs, results_root
from . import studies  # noqa: F401  (registers the studies)

__all__ = ['sharing_summary', 'label_free_choice', 'task_report_text', 'write_task_report']


def _ms(values: List[float], digits: int = 3) -> str:
    if not values:
        return ''
    sd = statistics.stdev(values) if len(values) > 1 else 0.
    return f'{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}'


def sharing_summary(per_seed: List[List[float]]) -> Dict[str, Any]:
    """Per-layer JS over seeds: mean, std, early/late halves, and the seeds where late > early."""
    t = torch.tensor(per_seed, dtype=torch.float64)
    half = t.shape[1] // 2
    early, late = t[:, :half].mean(1), t[:, half:].mean(1)
    return {'mean': t.mean(0).tolist(), 'std': (t.std(0) if len(t) > 1 else torch.zeros(t.shape[1])).tolist(),
            'early': early.tolist(), 'late': late.tolist(), 'late_above_early': int((late > early).sum()), 'n': len(t)}


def _per_seed(result: dict, key: str) -> Optional[List[float]]:
    """A per-layer JS list of a result; 'js_data_excess' is the sharing control's cross minus same data."""
    if key == 'js_data_excess':
        cross, same = result.get('js_cross_data'), result.get('js_same_data')
        return [c - s for c, s in zip(cross, same)] if cross and same else None
    return result.get(key)


def _sharing_rows(runs: Dict[str, Dict[int, dict]], key: str) -> List[str]:
    lines = []
    for config, records in runs.items():
        per_seed = [v for v in (_per_seed(r['result'], key) for r in records.values()) if v]
        if not per_seed:
            continue
        s = sharing_summary(per_seed)
        layers = ', '.join(f'{m:.3f}±{sd:.3f}' for m, sd in zip(s['mean'], s['std']))
        lines.append(f'| `{config}` | {key} | {layers} | {_ms(s["early"])} | {_ms(s["late"])} | '
                     f'{s["late_above_early"]} of {s["n"]} |')
    return lines


def _task_weights(records: List[dict]) -> List[Dict[str, List[List[float]]]]:
    """Per seed, each task's (L, K) weights: mixture alphas, or a router's route frequencies."""
    weights = [r['result'].get('task_alphas') or r['result'].get('task_routes') for r in records]
    return [w for w in weights if w]


def _pair_heatmap(runs: Dict[str, Dict[int, dict]], config: str, path) -> Optional[str]:
    alphas = _task_weights(list(runs.get(config, {}).values()))
    if not alphas:
        return None
    tasks = list(alphas[0])
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:]]
    if len(pairs) > 28:  # past 8 tasks a pair axis is unreadable; the per-layer JS table stands for it
        return None
    grid = torch.stack([torch.stack([js_divergence(torch.tensor(al[a]), torch.tensor(al[b])) for a, b in pairs], 1)
                        for al in alphas]).mean(0)  # (layers, pairs), mean over seeds
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(pairs), 3.8))
    im = ax.imshow(grid.numpy(), vmin=0, vmax=max(0.05, grid.max().item()), cmap='magma', aspect='auto')
    ax.set_xticks(range(len(pairs)), [f'{a}-{b}' for a, b in pairs], rotation=60, fontsize=7)
    ax.set_ylabel('layer')
    ax.set_title(f'{config}: JS between tasks, mean of {len(alphas)} seeds', fontsize=9)
    fig.colorbar(im, ax=ax, label='bits')
    return _save(fig, path, dpi=110, bbox_inches='tight')


def _route_heatmap(runs: Dict[str, Dict[int, dict]], config: str, path) -> Optional[str]:
    """Task x (layer, template) route frequencies of the first seed (templates have no identity across seeds)."""
    records = runs.get(config, {})
    routes = records[min(records)]['result'].get('task_routes') if records else None
    if not routes:
        return None
    grid = torch.stack([torch.tensor(v).flatten() for v in routes.values()])  # (tasks, L * K)
    num_templates = len(next(iter(routes.values()))[0])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2 + 0.12 * grid.shape[1], 1.2 + 0.2 * len(routes)))
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap='viridis', aspect='auto', interpolation='nearest')
    num_layers = grid.shape[1] // num_templates
    for l in range(1, num_layers):
        ax.axvline(l * num_templates - 0.5, color='white', lw=1)
    ax.set_xticks([l * num_templates + (num_templates - 1) / 2 for l in range(num_layers)], range(num_layers))
    ax.set_yticks(range(len(routes)), list(routes), fontsize=6)
    ax.set_xlabel(f'layer (blocks of {num_templates} templates)')
    ax.set_title(f'{config}: how often each task runs each template (eval, seed {min(records)})', fontsize=9)
    fig.colorbar(im, ax=ax, label='fraction of examples')
    return _save(fig, path, dpi=110, bbox_inches='tight')


def _transfer_rows(runs: Dict[str, Dict[int, dict]]) -> List[str]:
    full = {s: r['result']['top1'] for s, r in runs.get('full', {}).items()}
    lines = ['| mode | top-1 (mean ± std) | % of full fine-tuning | trainable | % of full\'s trainable | n |',
             '|---|---|---|---|---|---|']
    full_params = next((r['result']['trainable'] for r in runs.get('full', {}).values()), None)
    for mode, records in runs.items():
        top1 = [r['result']['top1'] for r in records.values()]
        rel = [100 * r['result']['top1'] / full[s] for s, r in records.items() if full.get(s)]
        trainable = next(iter(records.values()))['result']['trainable']
        frac = f'{100 * trainable / full_params:.2f}' if full_params else ''
        lines.append(f'| `{mode}` | {_ms(top1, 2)} | {_ms(rel, 1)} | {trainable:,} | {frac} | {len(top1)} |')
    return lines


def label_free_choice(runs: Dict[str, Dict[int, dict]], condition: str):
    """Per seed, the `condition-ALIGN` configuration the label-free rule picks across alignments, and its top-1."""
    configs = {c: rs for c, rs in runs.items() if c.startswith(condition + '-')}
    seeds = sorted(set.intersection(*[set(rs) for rs in configs.values()])) if configs else []
    picked, top1 = [], []
    for s in seeds:
        names = sorted(configs)
        i = select_candidate([{'score': configs[c][s]['result']['score'],
                               'decreased': configs[c][s]['result'].get('decreased', True)} for c in names])
        picked.append(names[i])
        top1.append(configs[names[i]][s]['result']['top1'])
    return picked, top1


def _adaptation_rows(runs: Dict[str, Dict[int, dict]]) -> List[str]:
    lines = ['| condition | alignment picked per seed (label-free) | top-1 (mean ± std) | n |', '|---|---|---|---|']
    for condition in ('mixture', 'mixture_adabn'):
        picked, top1 = label_free_choice(runs, condition)
        if picked:
            lines.append(f'| {condition} (selected) | {", ".join(picked)} | {_ms(top1, 2)} | {len(picked)} |')
    lines += ['', '| configuration | weights chosen per seed | candidates: weight -> label-free score / top-1 '
              '(seed 0; top-1 read after the choice) |', '|---|---|---|']
    for config, records in runs.items():
        cands = [r['result'].get('candidates') for r in records.values()]
        if not cands[0]:
            continue
        first = ', '.join(f'{c["weight"]:g} -> {c["score"]:.3f} / {c["top1"]:.1f}{"" if c["decreased"] else " (rose)"}'
                          for c in cands[0])
        weights = ', '.join(f'{r["result"]["weight"]:g}' for r in records.values())
        lines.append(f'| `{config}` | {weights} | {first} |')
    return lines


def _curves(runs: Dict[str, Dict[int, dict]], path) -> Optional[str]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    drawn = False
    for config, records in runs.items():
        curves = [r['result']['curves'][str(r['result']['weight'])] for r in records.values()
                  if r['result'].get('curves')]
        if curves:
            n = min(len(c) for c in curves)
            mean = torch.tensor([[h['loss'] for h in c[:n]] for c in curves]).mean(0)
            ax.plot(range(1, n + 1), mean.tolist(), label=config, lw=1)
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel('adaptation step')
    ax.set_ylabel('objective (chosen weight)')
    ax.legend(fontsize=6)
    return _save(fig, path, dpi=110, bbox_inches='tight')


def _sections(study, runs: Dict[str, Dict[int, dict]], folder, plots: bool):
    """The report's lines and the figures it shows (drawn when `plots`): (lines, {name: path})."""
    rows = [line for key in ('js_per_layer', 'js_same_data', 'js_cross_data', 'js_data_excess', 'js_sources',
                             'js_target') for line in _sharing_rows(runs, key)]
    lines, paths = [], {}
    if rows:
        lines += ['| configuration | between | JS per layer (bits, mean ± std over seeds) | first half | second half | '
                  'seeds with second > first |', '|---|---|---|---|---|---|', *rows]

    def figure(key: str, name: str, draw, alt: str) -> None:
        path = folder / name
        if (draw() if plots else path.is_file() or None):
            paths[key] = str(path)
            lines.append(f'\n![{alt}]({name})')
    for config in ('isomix', 'mixture_adabn-mm', 'source_only', 'route_task_wpl', 'route_input_gumbel'):
        if _task_weights(list(runs.get(config, {}).values())):
            figure(f'pairs-{config}', f'sharing-pairs-{config}.png',
                   lambda c=config: _pair_heatmap(runs, c, folder / f'sharing-pairs-{c}.png'), config)
    for config, records in runs.items():  # the sharing controls: both copies' mixtures side by side
        seed = min(records)
        result = records[seed]['result']
        if 'js_same_data' in result:
            name = f'mixtures-{config}-seed{seed}.png'
            figure(f'mixtures-{config}', name, lambda r=result, n=name, c=config, s=seed: plot_task_mixtures(
                {t: torch.tensor(a) for t, a in r['task_alphas'].items()}, folder / n,
                f'{study.name} {c}, seed {s}: alpha per task (layers x templates)'), f'{config} mixtures, seed {seed}')
    for config in runs:
        if runs[config][min(runs[config])]['result'].get('task_routes'):
            figure(f'routes-{config}', f'routes-{config}.png',
                   lambda c=config: _route_heatmap(runs, c, folder / f'routes-{c}.png'), f'{config} routes')
    if 'full' in runs:
        lines += ['', *_transfer_rows(runs)]
    if any(r['result'].get('candidates') for rs in runs.values() for r in rs.values()):
        lines += ['', *_adaptation_rows(runs)]
        figure('curves', 'adaptation-curves.png', lambda: _curves(runs, folder / 'adaptation-curves.png'),
               'objective per step')
    return lines, paths


def _runs(study_name: str, scale: str):
    study = STUDIES[study_name]
    runs = finished_runs(study.name, scale)
    if not runs:
        raise FileNotFoundError(f'study {study.name!r} has no finished runs at scale {scale!r}')
    return study, {c: runs[c] for c in study.configs if c in runs}, results_root() / study.name / scale


def _text(study, scale: str, lines: List[str]) -> str:
    flag = '' if scale == 'cpu' else f' --scale {scale}'
    return (f'# {study.name} ({scale}): sharing, curves, choices\n\n' + '\n'.join(lines).strip('\n') +
            f'\n\nThis file: `python -m experiments.task_report {study.name}{flag}`; the study\'s tables and '
            f'verdict: [report.md](report.md).\n')


def task_report_text(study_name: str, scale: str = 'cpu') -> str:
    """sharing.md's text from the result files, without drawing (the figures it names as they are on disk)."""
    study, runs, folder = _runs(study_name, scale)
    return _text(study, scale, _sections(study, runs, folder, plots=False)[0])


def write_task_report(study_name: str, scale: str = 'cpu') -> Dict[str, str]:
    """Write sharing.md and the figures (module docstring) for a study's finished runs; return their paths."""
    study, runs, folder = _runs(study_name, scale)
    lines, paths = _sections(study, runs, folder, plots=True)
    paths['sharing'] = str(folder / 'sharing.md')
    atomic_write_bytes(_text(study, scale, lines).encode(), paths['sharing'])
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m experiments.task_report', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('study', choices=sorted(STUDIES))
    p.add_argument('--scale', default='cpu')
    args = p.parse_args(argv)
    try:
        paths = write_task_report(args.study, args.scale)
    except FileNotFoundError as e:
        print(f'task_report: error: {e}', file=sys.stderr)
        return 2
    print('\n'.join(f'{k}: {v}' for k, v in paths.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
