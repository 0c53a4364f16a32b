"""Multi-task experiment: MNIST, USPS, MNIST-M, CIFAR-10 over one bank, against two baselines.

    python experiments/multitask.py [--out output/experiments] [--epochs 6]

Runs (same trunk, data subsets and schedule, hparams/multitask_digits.yaml):
  isomix      one bank, one mixture + statistics + head per task (the compositional model)
  hard-shared one bank and one mixture for all tasks (one trunk), a head per task
  independent one full model per task
Writes per run the folder train_tasks writes (checkpoints, mixtures.png, sharing.png) and
results.md / results.json with accuracy and parameters.
"""
import argparse
import json
from pathlib import Path

import torch

from timm_isomix.tasks.multitask import read_task_config, train_tasks

REPO = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tasks', default=str(REPO / 'hparams' / 'multitask_digits.yaml'))
    p.add_argument('--out', default='output/experiments')
    p.add_argument('--epochs', type=int, default=None, help='override the YAML')
    p.add_argument('--train-limit', type=int, default=None, help='override the YAML (images per task)')
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (1: best on a shared 2-core CPU)')
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    base = read_task_config(a.tasks).to_dict()
    for key, value in (('epochs', a.epochs), ('train_limit', a.train_limit)):
        if value is not None:
            base[key] = value
    names = [t['name'] for t in base['tasks']]
    runs = {}
    for method, extra in (('isomix', {}), ('hard-shared', {'hard_shared': True})):
        r = train_tasks({**{**base, **extra}, 'output': a.out, 'experiment': f'multitask-{method}', 'seed': a.seed})
        runs[method] = dict(top1=r['top1'], params=r['params'], own=r['task_params'], js=r['js_per_layer'], dir=r['out_dir'])
    indep = {'top1': {}, 'params': 0, 'own': {}, 'dir': []}
    for t in base['tasks']:
        r = train_tasks({**base, 'tasks': [t], 'output': a.out, 'experiment': f'multitask-independent-{t["name"]}',
                         'seed': a.seed})
        indep['top1'][t['name']] = r['top1'][t['name']]
        indep['params'] += r['params']
        indep['own'][t['name']] = r['params']
        indep['dir'].append(r['out_dir'])
    runs['independent'] = indep
    lines = ['| method | ' + ' | '.join(names) + ' | mean | params (all tasks) | params per task (own) |',
             '|---|' + '---|' * (len(names) + 3)]
    for method, r in runs.items():
        accs = [r['top1'][n] for n in names]
        own = sorted(set(r['own'].values()))
        lines.append(f'| {method} | ' + ' | '.join(f'{x:.1f}' for x in accs) +
                     f' | {sum(accs) / len(accs):.1f} | {r["params"]:,} | {", ".join(f"{o:,}" for o in own)} |')
    js = runs['isomix']['js']
    lines += ['', 'isomix per-layer Jensen-Shannon divergence between tasks (mean over pairs, bits): ' +
              ', '.join(f'{x:.3f}' for x in js)]
    table = '\n'.join(lines)
    print(table)
    out = Path(a.out)
    (out / 'multitask-results.md').write_text(table + '\n')
    (out / 'multitask-results.json').write_text(json.dumps(runs, indent=1))


if __name__ == '__main__':
    main()
