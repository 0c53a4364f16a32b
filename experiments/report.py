"""Reports of a study from its result files: its tables (mean +- std over seeds, n), its verdicts
(`verdicts.py`), the commands that reproduce it, JSON and plots."""
import dataclasses
import json
import statistics
from typing import Any, Dict, List

import torch

from timm_isomix.train.files import atomic_write_bytes
from timm_isomix.train.plots import plot_mixtures
from .runner import STUDIES, Study, finished_runs, results_root
from .verdicts import Results, verdicts_of

__all__ = ['summarize', 'markdown_table', 'report_text', 'write_report']

# Studies whose report also shows another study's runs: the same trunk, data, steps and seeds, run once there.
CONTROLS = {'routing-digits-cifar10': ('multitask-digits-cifar10', ('isomix', 'hard_shared', 'independent'))}
# Studies whose configurations are METHOD_T<tasks>: one more table, a metric per method and task count.
PIVOTS = {'routing-scaling': 'train_time_per_task'}


def _mean_std(values: List[float]):
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.)


def summarize(study: Study, scale: str = 'cpu', source: str = None, configs=None) -> List[Dict[str, Any]]:
    """One row per configuration with finished runs: n, seeds, mean and std of each metric, params, MACs, time.

    `source` reads another study's runs (its `configs`) with this study's metrics."""
    rows = []
    runs = finished_runs(source or study.name, scale)
    for name in configs or study.configs:
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
    mean, std = row[f'{metric}_mean'], row[f'{metric}_std']
    if std == 0 and float(mean).is_integer():  # a count the same in every seed (parameters)
        return f'{int(mean):,}'
    return f'{row[f"{metric}_mean"]:.{digits}f} ± {row[f"{metric}_std"]:.{digits}f}'


def markdown_table(study: Study, rows: List[Dict[str, Any]]) -> str:
    metrics = list(study.metrics)
    mixing = any('moved_mean' in r for r in rows)
    head = ['configuration', *[f'{m} (mean ± std)' for m in metrics], 'n', 'params', 'MMACs', 'train min']
    if mixing:
        head += ['entropy (nats)', 'moved (TV)', 'layers changed', 'layer diversity (JS)']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        cells = [f'`{r.get("source", "")}{r["config"]}`', *[_fmt(r, m) for m in metrics], str(r['n']),
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


def _pivot(study: Study, rows: List[Dict[str, Any]], metric: str) -> str:
    """Methods as rows, task counts as columns (configurations named METHOD_T<count>)."""
    cells: Dict[str, Dict[int, str]] = {}
    for r in rows:
        method, count = r['config'].rsplit('_T', 1)
        cells.setdefault(method, {})[int(count)] = _fmt(r, metric)
    counts = sorted({c for v in cells.values() for c in v})
    lines = [f'| {metric} (mean ± std) | ' + ' | '.join(f'{c} tasks' for c in counts) + ' |',
             '|' + '---|' * (len(counts) + 1)]
    lines += [f'| `{m}` | ' + ' | '.join(v.get(c, '') for c in counts) + ' |' for m, v in cells.items()]
    return '\n'.join(lines)


def _run_flags(study: Study, scale: str) -> str:
    """The `run` flags of a scale: the fields in which its result files differ from the study's default."""
    if scale == 'cpu':
        return ''
    record = next(r for rs in finished_runs(study.name, scale).values() for r in rs.values())
    preset = record.get('preset')  # a preset's scale: its name, then the fields overridden on top of it
    default = dataclasses.asdict(study.base_scale(preset))
    return (f' --preset {preset}' if preset else '') + ''.join(
        f' --{k.replace("_", "-")} {"all" if v is None else v}'
        for k, v in record['scale_fields'].items() if k != 'overrides' and v != default.get(k))


def _preset_lines(study: Study, scale: str, rows: List[Dict[str, Any]]) -> List[str]:
    """For a preset's scale: what the preset changes in every configuration, and the configurations with fewer
    than 3 seeds (experiments/gpu.sh's 8-minute plan runs one seed)."""
    record = next(r for rs in finished_runs(study.name, scale).values() for r in rs.values())
    if not record.get('preset'):
        return []
    preset = study.base_scale(record['preset'])
    lines = [f'Preset `{record["preset"]}`: every configuration with `{json.dumps(preset.overrides)}` merged in.']
    few = [f'`{r["config"]}` ({r["n"]})' for r in rows if r['n'] < 3]
    if few:
        lines.append(f'Fewer than 3 seeds so far, for lack of time (experiments/gpu.sh runs seed 0 in its 8-minute plan, '
                     f'seeds 0 to 2 with --full): {", ".join(few)}.')
    return lines


def _verdict_lines(study: Study, scale: str) -> List[str]:
    verdicts = verdicts_of(study.name, scale)
    if not verdicts:
        return ['No verdict is recorded for this scale (`experiments/verdicts.py`).']
    results, lines = Results(), []
    for v in verdicts:
        lines += [f'*{v.question}*', '', f'**{v.verdict.capitalize()}.** {v.sentence(results, scale)}', '']
    return lines[:-1]


def report_text(study: Study, scale: str = 'cpu') -> str:
    """report.md's text: description, tables, verdicts and the commands that reproduce them."""
    folder = results_root() / study.name / scale
    rows = summarize(study, scale)
    if not rows:
        raise FileNotFoundError(f'study {study.name!r} has no finished runs at scale {scale!r} in {folder}')
    parts = [f'# {study.name} ({scale})', study.description]
    if scale != 'cpu':
        parts.append(f'The sizes above are the study\'s default scale; this one differs from it in:'
                     f'{_run_flags(study, scale)}.')
        parts += _preset_lines(study, scale, rows)
    parts.append(markdown_table(study, rows))
    if study.name in PIVOTS:
        parts.append(_pivot(study, rows, PIVOTS[study.name]))
    if study.name in CONTROLS:
        source, configs = CONTROLS[study.name]
        control = [dict(r, source=f'{source}/') for r in summarize(study, scale, source, configs)]
        parts += [f'The controls: {source}\'s runs of the same trunk, data, steps and seeds.',
                  markdown_table(study, control)]
    parts += ['## Verdict', '\n'.join(_verdict_lines(study, scale))]
    seeds = ' '.join(map(str, sorted({s for r in rows for s in r['seeds']})))
    flag = '' if scale == 'cpu' else f' --scale {scale}'
    run = f'python -m experiments run {study.name} --seeds {seeds}{_run_flags(study, scale)} --jobs 2 --threads 1'
    commands = [run,
                f'python -m experiments report {study.name}{flag}']
    if (folder / 'sharing.md').is_file():
        commands.append(f'python -m experiments.task_report {study.name}{flag}')
    parts += ['## Reproduce', '\n'.join(f'    {c}' for c in commands)]
    figures = [f'[{n}]({n})' for n in ('sharing.md', 'curves.png', 'mixtures.png') if (folder / n).is_file()]
    if figures:
        parts.append('Also here: ' + ', '.join(figures) + '.')
    return '\n\n'.join(parts) + '\n'


def write_report(study: Study, scale: str = 'cpu', plots: bool = True) -> Dict[str, str]:
    """Write `report.md`, `report.json` and (with `plots`) `curves.png` and `mixtures.png` (final alpha averaged
    over seeds, per soft configuration) into the study's result folder; return their paths."""
    folder = results_root() / study.name / scale
    rows = summarize(study, scale)
    if not rows:
        raise FileNotFoundError(f'study {study.name!r} has no finished runs at scale {scale!r} in {folder}')
    paths = {'report': str(folder / 'report.md'), 'json': str(folder / 'report.json')}
    if plots:
        paths.update(_write_plots(study, scale, folder))
    atomic_write_bytes(report_text(study, scale).encode(), paths['report'])
    atomic_write_bytes(json.dumps(rows, indent=1).encode(), paths['json'])
    return paths


def _write_plots(study: Study, scale: str, folder) -> Dict[str, str]:
    paths = {'curves': str(folder / 'curves.png')}
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
