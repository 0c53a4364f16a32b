"""Cost of grouped per-example routes: `python -m timm_isomix.tools.bench_routing`.

Two comparisons, each timed in one process, interleaved (the order of the two sides alternates every
repetition) after warm-up, so that load from other processes hits both alike; times are medians over
repetitions and each ratio (routed / plain) is the median over repetitions of that repetition's ratio:

- **layer**: one executed layer (`BasicLayer` of `isomix_iso_64_8_p2`: width 64 at 16 x 16) on a batch of
  64, with a template per example drawn uniformly from the bank's K = 4 (every template runs on about a
  quarter of the batch; `bank.run_routed`: one sort, K group runs, one scatter), against the same layer
  running one template on the whole batch. Training (forward + backward) and inference (no grad).
- **step**: a training step (forward, loss, router loss, backward, optimizer step) of the routed network
  (`routing='input'`, and `'task'` drawing a route per example or, `draw='task'`, one per batch) against
  the same network with a fixed (hard) order, batch 64 at 32 px;
  also for the routing studies' smaller trunk (`STUDY_TRUNK`: width 48, patch 4, so 8 x 8 maps), where
  the groups' smaller convolutions cost relatively more.

Targets (issue 14): routed layer <= 1.15 x plain layer; routed training step <= 1.15 x fixed order.
On CPU, freed memory is kept in the process first (`tools.memory.retain_freed_memory`, as benchmark.py).
Writes JSON (`--out`) and prints a table.
"""
import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import timm

from ..bank import run_routed
from .memory import retain_freed_memory

__all__ = ['layer_cases', 'step_cases', 'interleaved', 'run', 'main']

TARGET = 1.15
# (name, routing, router, router_args) of the training-step comparisons
STEP_CASES = (('input_reinforce', 'input', 'reinforce', None), ('input_gumbel', 'input', 'gumbel', None),
              ('task_wpl', 'task', 'wpl', None), ('task_wpl_draw_task', 'task', 'wpl', {'draw': 'task'}))
# The trunk of the routing studies (experiments/studies/routing.py).
STUDY_TRUNK = dict(width=48, patch_size=4, depth=8, num_templates=4)


def interleaved(fns: Dict[str, Callable[[], None]], reps: int, steps: int, warmup: int) -> Dict[str, float]:
    """Median seconds per call of 'plain' and 'routed', and the median over repetitions of their ratio.

    The two run alternately, `steps` calls each per repetition, the order reversing every repetition; the
    ratio of each repetition compares calls a moment apart, so load that drifts over the run cancels out.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / steps)
    out = {n: statistics.median(t) for n, t in times.items()}
    out['ratio'] = statistics.median(a / b for a, b in zip(times['routed'], times['plain']))
    return out


def layer_cases(batch: int = 64, seed: int = 0) -> Dict[str, Dict[str, Callable[[], None]]]:
    """{mode: {'plain': fn, 'routed': fn}}: one executed layer, one template vs a uniform route per example."""
    torch.manual_seed(seed)
    model = timm.create_model('isomix_iso_64_8_p2', order=[0] * 8)
    bank, layer = model.bank, model.schedule.layers[0]
    x = model.stem(torch.randn(batch, 3, 32, 32)).detach()
    index = torch.randint(0, bank.num_templates, (batch,))
    x_grad = x.clone().requires_grad_(True)

    def templates():
        return bank.unflatten_rows(bank.weight, bank.affine, bank.num_templates)

    def train(routed: bool) -> Callable[[], None]:
        def fn():
            t = templates()
            y = run_routed(layer, x_grad, t, index) if routed else layer(x_grad, t[0])
            y.sum().backward()
        return fn

    def infer(routed: bool) -> Callable[[], None]:
        @torch.no_grad()
        def fn():
            t = templates()
            run_routed(layer, x, t, index) if routed else layer(x, t[0])
        return fn
    layer.train()
    return {'train': {'plain': train(False), 'routed': train(True)},
            'infer': {'plain': infer(False), 'routed': infer(True)}}


def step_cases(routing: str, router: str, batch: int = 64, seed: int = 0,
               **model_kwargs) -> Dict[str, Callable[[], None]]:
    """{'plain': fn, 'routed': fn}: one training step of the routed network and of the fixed-order network."""
    torch.manual_seed(seed)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    routed = timm.create_model('isomix_iso_64_8_p2', routing=routing, router=router, **model_kwargs).train()
    model_kwargs.pop('router_args', None)
    plain = timm.create_model('isomix_iso_64_8_p2', order=list(routed.schedule.mixture.order), **model_kwargs).train()

    def step(model, opt) -> Callable[[], None]:
        def fn():
            out = model(x)
            per = F.cross_entropy(out, y, reduction='none')
            loss = per.mean()
            if getattr(model, 'router', None) is not None:
                loss = loss + model.router.loss(per, out.argmax(-1) == y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return fn
    return {'plain': step(plain, torch.optim.SGD(plain.parameters(), lr=1e-3)),
            'routed': step(routed, torch.optim.SGD(routed.parameters(), lr=1e-3))}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = retain_freed_memory()
    results: Dict[str, Any] = {}
    for mode, fns in layer_cases(args.batch).items():
        t = interleaved(fns, args.reps, args.steps, args.warmup)
        results[f'layer_{mode}'] = {'plain_ms': 1e3 * t['plain'], 'routed_ms': 1e3 * t['routed'], 'ratio': t['ratio']}
    for trunk, kwargs in (('', {}), ('study_trunk_', STUDY_TRUNK)):
        for name, routing, router, router_args in STEP_CASES:
            t = interleaved(step_cases(routing, router, args.batch, router_args=router_args, **kwargs), args.reps,
                            max(1, args.steps // 4), args.warmup)
            results[f'step_{trunk}{name}'] = {'plain_ms': 1e3 * t['plain'], 'routed_ms': 1e3 * t['routed'],
                                                          'ratio': t['ratio']}
    return {
        'command': 'python -m timm_isomix.tools.bench_routing ' + ' '.join(args.argv),
        'machine': {'cpu': platform.processor() or platform.machine(), 'threads': torch.get_num_threads(),
                    'load_average_1_5_15min': [round(v, 2) for v in os.getloadavg()],
                    'torch': torch.__version__, 'allocator_retains_freed_memory': retained},
        'batch': args.batch, 'img_size': 32, 'reps': args.reps, 'steps': args.steps,
        'target_ratio': TARGET, 'results': results,
        'targets_met': {k: v['ratio'] <= TARGET for k, v in results.items()},
    }


def format_table(report: Dict[str, Any]) -> str:
    lines = ['| case | plain ms | routed ms | routed / plain | <= 1.15 |', '|---|---|---|---|---|']
    for name, r in report['results'].items():
        lines.append(f"| {name} | {r['plain_ms']:.2f} | {r['routed_ms']:.2f} | {r['ratio']:.3f} | "
                     f"{'yes' if r['ratio'] <= TARGET else 'no'} |")
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--reps', type=int, default=15, help='timed repetitions per side (median)')
    p.add_argument('--steps', type=int, default=8, help='calls per repetition (a quarter for training steps)')
    p.add_argument('--warmup', type=int, default=3)
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
