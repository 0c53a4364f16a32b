"""The adapters-vs-LoRA comparison from its result files: one table, one figure (val top-1 against trainable parameters
and against the bytes a task ships) and the per-task numbers its verdict rests on.

    python -m experiments.lora_report [--scale cpu]

writes comparison.md and comparison.png into adapters-vs-lora-compare's result folder. The verdict's rule, per task:
the adapter (mixture_patch, the one lora_matched is matched to) matches LoRA when its mean val top-1 is at least
lora_matched's minus the larger of the two standard deviations over seeds, and falls short when it is below by more
than twice that; the claim is supported when it matches on every task, contradicted when it falls short on every
task, else not shown at this scale.
"""
import argparse
import statistics
import sys
from typing import Dict, List, Optional

from timm_isomix.train.files import atomic_write_bytes
from .runner import finished_runs, results_root
from .studies.adapters_vs_lora import COMPARE, MATCHED_TO, METHODS, SELECT, TASKS

__all__ = ['rows', 'verdicts', 'comparison_table', 'write_comparison']

TASK_TITLES = {'mnistm': 'MNIST-M over the digit bank', 'cifar10': 'CIFAR-10 over the mini-ImageNet bank',
               'cifar10_r50': 'CIFAR-10 over isomix_resnet50 (warm start)'}
COLORS = {'mixture': '#9ecae1', 'patch': '#4292c6', 'mixture_patch': '#08519c', 'lora_matched': '#fd8d3c',
          'lora_large': '#d94801', 'linear': '#969696', 'full': '#000000'}


def _ms(values: List[float]):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.)


def rows(scale: str = 'cpu') -> List[Dict]:
    """One row per (task, method) with finished comparison runs: top-1 mean/std/n, counts, the held-out choice."""
    runs = finished_runs(COMPARE, scale)
    out = []
    for task in TASKS:
        for method in METHODS:
            records = runs.get(f'{task}.{method}', {})
            if not records:
                continue
            results = [records[s]['result'] for s in sorted(records)]
            mean, sd = _ms([r['top1'] for r in results])
            first = results[0]
            out.append(dict(task=task, method=method, top1=mean, std=sd, n=len(results), seeds=sorted(records),
                            trainable=first['trainable'], file_bytes=first['file_bytes'], lr=first.get('lr'),
                            end=first.get('end'), heldout_top1=first.get('heldout_top1'),
                            layers=first.get('layers'), rank=first.get('rank'),
                            train_images=first['train_images'], measured_images=first['measured_images']))
    return out


def verdicts(table: List[Dict]) -> Dict[str, Optional[str]]:
    """Per task: 'matches', 'falls short' or 'between' (the rule in the module docstring); then 'overall'."""
    by = {(r['task'], r['method']): r for r in table}
    out: Dict[str, Optional[str]] = {}
    for task in TASKS:
        a, l = by.get((task, MATCHED_TO)), by.get((task, 'lora_matched'))
        if a is None or l is None:
            out[task] = None
            continue
        spread = max(a['std'], l['std'])
        gap = l['top1'] - a['top1']
        out[task] = 'matches' if gap <= spread else 'falls short' if gap > 2 * spread else 'between'
    found = [v for v in out.values()]
    if any(v is None for v in found):
        out['overall'] = None
    elif all(v == 'matches' for v in found):
        out['overall'] = 'supported'
    elif all(v == 'falls short' for v in found):
        out['overall'] = 'contradicted'
    else:
        out['overall'] = 'not shown at this scale'
    return out


def comparison_table(table: List[Dict]) -> str:
    lines = ['| task | method | trainable | file (KiB) | lr (held-out top-1) | val top-1 (mean ± std) | n |',
             '|---|---|---|---|---|---|---|']
    for r in table:
        what = r['method'] + (f' (rank {r["rank"]}, {r["layers"]} convs' + (f', {r["end"]} end)' if r['end'] else ')')
                              if r['rank'] else '')
        choice = f'{r["lr"]:g} ({r["heldout_top1"]:.2f})' if r['heldout_top1'] is not None else ''
        lines.append(f'| {r["task"]} | {what} | {r["trainable"]:,} | {r["file_bytes"] / 1024:.1f} | {choice} | '
                     f'{r["top1"]:.2f} ± {r["std"]:.2f} | {r["n"]} |')
    return '\n'.join(lines)


def _plot(table: List[Dict], path: str) -> None:
    from timm_isomix.train.plots import _pyplot, _save  # the project's headless matplotlib
    plt = _pyplot()
    tasks = [t for t in TASKS if any(r['task'] == t for r in table)]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.3 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for ax, key, label in ((row[0], 'trainable', 'trainable parameters'),
                               (row[1], 'file_bytes', 'bytes the task ships (safetensors)')):
            for r in (r for r in table if r['task'] == task):
                ax.errorbar(r[key], r['top1'], yerr=r['std'], fmt='o', color=COLORS[r['method']], capsize=3,
                            label=r['method'])
                ax.annotate(r['method'], (r[key], r['top1']), textcoords='offset points', xytext=(4, 4), fontsize=7)
            ax.set_xscale('log')
            ax.set_xlabel(label)
            ax.set_ylabel('val top-1 (%)')
            ax.set_title(TASK_TITLES[task], fontsize=9)
            ax.grid(alpha=.3)
    axes[0][0].legend(fontsize=7, loc='lower right')
    fig.suptitle('Adapters against LoRA, linear probe and full fine-tuning (mean ± std over seeds)', fontsize=10)
    _save(fig, path, dpi=100, bbox_inches='tight')


def _selection(scale: str) -> str:
    runs = finished_runs(SELECT, scale)
    lines = ['| task | method | held-out top-1 per lr (end) |', '|---|---|---|']
    for task in TASKS:
        for method in METHODS:
            cells = [f'{name.split(".", 2)[2]}: {recs[0]["result"]["top1"]:.2f}' for name, recs in runs.items()
                     if name.startswith(f'{task}.{method}.lr') and 0 in recs]
            if cells:
                lines.append(f'| {task} | {method} | {"; ".join(cells)} |')
    return '\n'.join(lines)


def write_comparison(scale: str = 'cpu') -> Dict[str, str]:
    """Write comparison.md and comparison.png; return their paths."""
    table = rows(scale)
    if not table:
        raise FileNotFoundError(f'{COMPARE} has no finished runs at scale {scale!r} in {results_root() / COMPARE}')
    folder = results_root() / COMPARE / scale
    v = verdicts(table)
    per_task = '; '.join(f'{t}: {v[t]}' for t in TASKS if v.get(t))
    text = (f'# Adapters against LoRA ({scale})\n\n'
            f'Val top-1 of each method (lr chosen at seed 0 on a held-out part of the training images, study '
            f'{SELECT}), seeds {sorted({s for r in table for s in r["seeds"]})}. "file" is the safetensors the task '
            'ships: the adapter\'s `save_task` file; LoRA\'s peft `adapter_model.safetensors` (LoRA weights and head) '
            'plus its BatchNorm statistics; the linear probe\'s head and statistics; the whole baked network for '
            f'full fine-tuning.\n\n{comparison_table(table)}\n\n![comparison](comparison.png)\n\n'
            f'Rule (experiments/lora_report.py): {MATCHED_TO} against lora_matched per task: {per_task}. '
            f'Verdict for "the adapter matches LoRA at equal trainable parameters": **{v["overall"]}**.\n\n'
            f'## The held-out choice\n\n{_selection(scale)}\n\n'
            f'Reproduce: `python -m experiments run {SELECT} --seeds 0`, `python -m experiments run {COMPARE} '
            '--seeds 0 1 2`, `python -m experiments.lora_report`.\n')
    paths = {'comparison': str(folder / 'comparison.md'), 'figure': str(folder / 'comparison.png')}
    atomic_write_bytes(text.encode(), paths['comparison'])
    _plot(table, paths['figure'])
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m experiments.lora_report', description=__doc__.split('\n\n')[0])
    p.add_argument('--scale', default='cpu')
    args = p.parse_args(argv)
    try:
        paths = write_comparison(args.scale)
    except FileNotFoundError as e:
        print(f'lora_report: error: {e}', file=sys.stderr)
        return 2
    print('\n'.join(paths.values()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
