"""Cost of mixed-task batches and of loading an adapter: `python -m timm_isomix.tools.bench_tasks`.

For each backbone, a `MultiTaskIsoMix` with 4 tasks (each its own mixture logits, statistics and head) runs
inference (eval, no grad; each task's mixed rows cached, as in serving) on a batch of 64:

- **mixed**: the 64 examples spread over the 4 tasks (16 each, in a random order): on the isometric trunk the tasks
  run side by side (models/task_wide.py), on the staged backbone grouped by task, each task's path run once on its
  group, the results put back in order;
- **grouped** (isometric trunk): the mixed batch grouped by task as on the staged backbone (`side_by_side.enabled`
  off), the cost side by side running removes;
- **one task**: the same 64 examples all of one task;
- **timm**: the one task baked into plain timm modules (`model.bake`; timm's own `ResNet` for the staged backbone),
  the reference that shows what running a task's path through the multi-task model costs;
- **timm per task**: each of the 4 tasks baked, each run on its own 16 examples (split beforehand): what serving
  4 networks costs without grouping, the reference that separates the grouping's cost from that of running 4
  networks of smaller batches.

Each comparison is timed in one process, interleaved (the order alternates every repetition, see
bench_routing.interleaved) after warm-up; times are medians and each ratio the median of per-repetition ratios.
Backbones: the multi-task studies' trunk (experiments/studies/multitask_learning.py TRUNK: `isomix_iso_64_8_p2`
at width 48, patch 4, 8 layers over 4 templates; 32 px) and `isomix_resnet50` (reuse 2, at `--resnet-size` px,
64 by default: a CPU budget; the relative cost of grouping falls as images grow). Target (issue 20): mixed <= 1.2 x
one task. Also measured: loading a saved adapter onto the model (`load_task` from a folder: reading and checking the
files, the backbone's fingerprint, building the task) and the adapter's file size. Writes JSON (`--out`).
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import timm
import torch

from ..models.multitask import MultiTaskIsoMix
from ..models.task_adapter import WEIGHTS_NAME
from .bench_routing import interleaved
from .memory import retain_freed_memory

__all__ = ['STUDY_TRUNK', 'TARGET', 'task_model', 'batch_cases', 'adapter_load', 'run', 'main']

TARGET = 1.2
NUM_TASKS = 4
# The multi-task studies' trunk (experiments/studies/multitask_learning.py TRUNK).
STUDY_TRUNK = ('isomix_iso_64_8_p2', dict(width=48, patch_size=4, depth=8, num_templates=4), 32)


def task_model(arch: str, kwargs: Dict[str, Any], seed: int = 0) -> MultiTaskIsoMix:
    """A multi-task model of NUM_TASKS tasks of 10 classes over `arch`, each task with logits of its own, in eval."""
    torch.manual_seed(seed)
    model = MultiTaskIsoMix(timm.create_model(arch, num_classes=0, **kwargs), {})
    for t in range(NUM_TASKS):
        path = model.add_task(f'task{t}', 10)
        with torch.no_grad():
            for s in path.schedules:
                s.mixture.logits.add_(torch.randn_like(s.mixture.logits))
    return model.eval()


def batch_cases(model: MultiTaskIsoMix, img_size: int, batch: int = 64) -> Dict[str, Callable[[], None]]:
    """{'mixed', 'grouped', 'one_task', 'timm', 'timm_per_task'}: inference on one batch (the module docstring)."""
    x = torch.randn(batch, 3, img_size, img_size)
    names = list(model.tasks)
    mixed = [names[i % len(names)] for i in torch.randperm(batch).tolist()]
    baked = model.bake(names[0])
    nets = {n: model.bake(n) for n in names}
    groups = {n: x[[i for i, t in enumerate(mixed) if t == n]] for n in names}

    def infer(fn):
        @torch.no_grad()
        def call():
            fn()
        return call

    def grouped():
        model.side_by_side.enabled = False
        try:
            model(x, task=mixed)
        finally:
            model.side_by_side.enabled = True
    return {'mixed': infer(lambda: model(x, task=mixed)), 'grouped': infer(grouped),
            'one_task': infer(lambda: model(x, task=names[0])),
            'timm': infer(lambda: baked(x)), 'timm_per_task': infer(lambda: [nets[n](g) for n, g in groups.items()])}


def adapter_load(model: MultiTaskIsoMix, reps: int) -> Dict[str, float]:
    """Median seconds of `load_task` of a saved adapter (fresh task names), its fingerprint part, its size in bytes."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_task('task0', folder)
        size = (Path(folder) / WEIGHTS_NAME).stat().st_size + (Path(folder) / 'adapter_config.json').stat().st_size
        loads, prints = [], []
        for r in range(reps):
            t0 = time.perf_counter()
            model.load_task(folder, name=f'loaded{r}')
            loads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.fingerprint()
            prints.append(time.perf_counter() - t0)
            del model.tasks[f'loaded{r}']
    return {'load_ms': 1e3 * statistics.median(loads), 'fingerprint_ms': 1e3 * statistics.median(prints),
            'adapter_bytes': size}


def _compare(fns: Dict[str, Callable[[], None]], a: str, b: str, args: argparse.Namespace) -> Dict[str, float]:
    t = interleaved({'routed': fns[a], 'plain': fns[b]}, args.reps, args.steps, args.warmup)
    return {f'{a}_ms': 1e3 * t['routed'], f'{b}_ms': 1e3 * t['plain'], 'ratio': t['ratio']}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = retain_freed_memory()
    backbones = {'study_trunk': STUDY_TRUNK, 'isomix_resnet50': ('isomix_resnet50', {}, args.resnet_size)}
    results: Dict[str, Any] = {}
    for name, (arch, kwargs, img_size) in backbones.items():
        model = task_model(arch, kwargs)
        fns = batch_cases(model, img_size, args.batch)
        results[name] = {
            'arch': arch, 'model_kwargs': kwargs, 'img_size': img_size,
            'mixed_vs_one_task': _compare(fns, 'mixed', 'one_task', args),
            **({} if model.staged else {'grouped_vs_one_task': _compare(fns, 'grouped', 'one_task', args)}),
            'one_task_vs_timm': _compare(fns, 'one_task', 'timm', args),
            'mixed_vs_timm_per_task': _compare(fns, 'mixed', 'timm_per_task', args),
            'adapter': adapter_load(model, args.load_reps),
        }
    return {
        'command': 'python -m timm_isomix.tools.bench_tasks ' + ' '.join(args.argv),
        'machine': {'cpu': platform.processor() or platform.machine(), 'threads': torch.get_num_threads(),
                    'load_average_1_5_15min': [round(v, 2) for v in os.getloadavg()],
                    'torch': torch.__version__, 'allocator_retains_freed_memory': retained},
        'batch': args.batch, 'num_tasks': NUM_TASKS, 'reps': args.reps, 'steps': args.steps, 'target_ratio': TARGET,
        'results': results,
        'targets_met': {k: v['mixed_vs_one_task']['ratio'] <= TARGET for k, v in results.items()},
    }


def format_table(report: Dict[str, Any]) -> str:
    lines = ['| backbone | px | one task ms | mixed ms | mixed / one task | <= 1.2 | grouped / one task | one task / timm '
             '| mixed / timm per task | adapter load ms | adapter KiB |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for name, r in report['results'].items():
        m, t, p, a = r['mixed_vs_one_task'], r['one_task_vs_timm'], r['mixed_vs_timm_per_task'], r['adapter']
        g = f"{r['grouped_vs_one_task']['ratio']:.3f}" if 'grouped_vs_one_task' in r else '– (mixed is grouped)'
        lines.append(f"| {name} | {r['img_size']} | {m['one_task_ms']:.1f} | {m['mixed_ms']:.1f} | {m['ratio']:.3f} | "
                     f"{'yes' if m['ratio'] <= TARGET else 'no'} | {g} | {t['ratio']:.3f} | {p['ratio']:.3f} | "
                     f"{a['load_ms']:.1f} | {a['adapter_bytes'] / 1024:.1f} |")
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--resnet-size', type=int, default=64, help='image size for isomix_resnet50')
    p.add_argument('--reps', type=int, default=15, help='timed repetitions per side (median)')
    p.add_argument('--steps', type=int, default=4, help='calls per repetition')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--load-reps', type=int, default=5, help='adapter loads timed (median)')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch\'s default)')
    p.add_argument('--out', default='', help='JSON file to write')
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else []
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    import sys
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = run(args)
    print(format_table(report))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == '__main__':
    main()
