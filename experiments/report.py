"""Reports of a study from its result files: a markdown table (mean +- std over seeds, n), JSON, plots."""
import json
import statistics
from typing import Any, Dict, List

import torch

from timm_isomix.train.files import atomic_write_bytes
from timm_isomix.train.plots import plot_mixtures
from .runner import Study, finished_runs, results_root

__all__ = ['summarize', 'markdown_table', 'write_report']


def _mean_std(values: List[float]):
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.)


def summarize(study: Study, scale: str = 'cpu') -> List[Dict[str, Any]]:
    """One row per configuration with finished runs: n, seeds, mean and std of each metric, params, MACs, time."""
    rows = []
    runs = finished_runs(study.name, scale)
    for name in study.configs:
        records = runs.get(name, {})
        if not records:
            continue
        results = [r['result'] for r in records.values()]
        row = {'config': name, 'n': len(results), 'seeds': sorted(records)}
        for metric in list(study.metrics) + ['entropy', 'moved', 'changed', 'diversity', 'train_time']:
            values = [float(r[metric]) for r in results if r.get(metric) is not None]
            if values:
                row[f'{metric}_mean'], row[f'{metric}_std'] = _mean_std(values)
        for key in ('params', 'macs'):
            if results[0].get(key) is not None:
                row[key] = results[0][key]
        rows.append(row)
    return rows


def _fmt(row: Dict[str, Any], metric: str, digits: int = 2) -> str:
    if f'{metric}_mean' not in row:
        return ''
    return f'{row[f"{metric}_mean"]:.{digits}f} ± {row[f"{metric}_std"]:.{digits}f}'


def markdown_table(study: Study, rows: List[Dict[str, Any]]) -> str:
    metrics = list(study.metrics)
    mixing = any('moved_mean' in r for r in rows)
    head = ['configuration', *[f'{m} (mean ± std)' for m in metrics], 'n', 'params', 'MMACs', 'train min']
    if mixing:
        head += ['entropy (nats)', 'moved (TV)', 'layers changed', 'layer diversity (JS)']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        cells = [f'`{r["config"]}`', *[_fmt(r, m) for m in metrics], str(r['n']),
                 f'{r["params"] / 1e6:.3f}M' if 'params' in r else '',
                 f'{r["macs"] / 1e6:.1f}' if 'macs' in r else '',
                 f'{r["train_time_mean"] / 60:.1f}' if 'train_time_mean' in r else '']
        if mixing:
            cells += [_fmt(r, 'entropy', 3), _fmt(r, 'moved', 3), _fmt(r, 'changed', 1), _fmt(r, 'diversity', 3)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _plot_curves(study: Study, scale: str, path) -> None:
    from timm_isomix.train.plots import _pyplot, _save
    plt = _pyplot()
    runs = finished_runs(study.name, scale)
    keys = [k for k in ('top1', 'entropy', 'moved') if any(k in h for rs in runs.values() for r in rs.values()
                                                          for h in r['history'])]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, records in runs.items():
            curves = [[h[key] for h in r['history'] if key in h] for r in records.values()]
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = torch.tensor([c[:n] for c in curves]).mean(0)
            ax.plot(range(1, n + 1), mean.tolist(), marker='.', label=name)
        ax.set_xlabel('epoch')
        ax.set_ylabel({'top1': 'val top-1 (%)', 'entropy': 'alpha entropy (nats)', 'moved': 'moved from start (TV)'}[key])
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f'{study.name} (mean over seeds)', fontsize=10)
    _save(fig, path, dpi=100, bbox_inches='tight')


def write_report(study: Study, scale: str = 'cpu') -> Dict[str, str]:
    """Write `report.md`, `curves.png` and `mixtures.png` (final alpha averaged over seeds, per soft
    configuration) into the study's result folder; return their paths."""
    folder = results_root() / study.name / scale
    rows = summarize(study, scale)
    if not rows:
        raise FileNotFoundError(f'study {study.name!r} has no finished runs at scale {scale!r} in {folder}')
    text = (f'# {study.name} ({scale})\n\n{study.description}\n\n{markdown_table(study, rows)}\n\n'
            f'Reproduce: `python -m experiments run {study.name} --seeds '
            f'{" ".join(map(str, sorted({s for r in rows for s in r["seeds"]})))}`; '
            f'this file: `python -m experiments report {study.name}`.\n')
    paths = {'report': str(folder / 'report.md')}
    atomic_write_bytes(text.encode(), paths['report'])
    atomic_write_bytes(json.dumps(rows, indent=1).encode(), str(folder / 'report.json'))
    paths['curves'] = str(folder / 'curves.png')
    _plot_curves(study, scale, paths['curves'])
    # Template identities are arbitrary within a seed (any permutation of the bank is the same network), so
    # the mean over seeds blurs a per-seed structure: each seed gets its own figure as well.
    mean_alphas, per_seed = {}, {}
    for name, records in finished_runs(study.name, scale).items():
        for seed, record in records.items():
            for mixture, a in (record['result'].get('alphas') or {}).items():
                per_seed.setdefault(seed, {})[f'{name}:{mixture}'] = torch.tensor(a)
        alphas = [r['result'].get('alphas') or {} for r in records.values()]
        for mixture in (alphas[0] or {}):
            mean_alphas[f'{name}:{mixture}'] = torch.tensor([a[mixture] for a in alphas]).mean(0)
    if mean_alphas:
        paths['mixtures'] = plot_mixtures(mean_alphas, str(folder / 'mixtures.png'),
                                          title=f'{study.name}: final alpha, mean over seeds')
    for seed, alphas in sorted(per_seed.items()):
        paths[f'mixtures_seed{seed}'] = plot_mixtures(alphas, str(folder / f'mixtures-seed{seed}.png'),
                                                      title=f'{study.name}: final alpha, seed {seed}')
    return paths
