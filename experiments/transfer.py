"""Transfer experiment: learn a held-out task (MNIST-M) as a new mixture over a frozen bank.

    python experiments/transfer.py [--out output/experiments]

1. Trains a multi-task isomix on MNIST, USPS and CIFAR-10 (hparams/multitask_digits.yaml without MNIST-M).
2. Adds MNIST-M as a new task (mixture and statistics start from MNIST's) and trains, on the same data:
     mixture     its mixture logits + head (+ its BatchNorm statistics); bank and stem frozen
     linear      a linear probe: head only, statistics frozen
     full        full fine-tuning of everything (bank included), on a copy of the model
   and checks that mixture-only transfer left the bank and stem bit-for-bit unchanged.
Writes transfer-results.md/json and mixtures.png / sharing.png with the new task.
"""
import argparse
import copy
import json
from pathlib import Path

import torch

from timm_isomix.tasks.transfer import transfer
from timm_isomix.train.datasets import prepare_dataset
from timm_isomix.models.multitask import count_params
from timm_isomix.tasks.data import load_task_data
from timm_isomix.tasks.multitask import load_task_model, read_task_config, train_tasks
from timm_isomix.train.plots import js_sharing, plot_sharing, plot_task_mixtures

REPO = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tasks', default=str(REPO / 'hparams' / 'multitask_digits.yaml'))
    p.add_argument('--held-out', default='mnistm')
    p.add_argument('--init-from', default='mnist')
    p.add_argument('--out', default='output/experiments')
    p.add_argument('--epochs', type=int, default=None, help='override the YAML')
    p.add_argument('--transfer-epochs', type=int, default=10)
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (1: best on a shared 2-core CPU)')
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = read_task_config(a.tasks).to_dict()
    if a.epochs is not None:
        cfg['epochs'] = a.epochs
    held = next(t for t in cfg['tasks'] if t['name'] == a.held_out)
    cfg['tasks'] = [t for t in cfg['tasks'] if t['name'] != a.held_out]
    r = train_tasks({**cfg, 'output': a.out, 'experiment': 'transfer-pretrain', 'seed': a.seed})
    out_dir = Path(r['out_dir'])
    model = load_task_model(out_dir / 'model.pth')
    root = prepare_dataset(held['data'])
    train = load_task_data(root, 'train', held['classes'], cfg['img_size'], cfg['train_limit'], a.seed, held['name'])
    val = load_task_data(root, 'val', held['classes'], cfg['img_size'], cfg['val_limit'], a.seed, held['name'])
    fit = dict(epochs=a.transfer_epochs, lr=cfg['lr'], batch_size=cfg['batch_size'], opt=cfg['opt'],
               weight_decay=cfg['weight_decay'], mixture_lr_mult=cfg['mixture_lr_mult'], seed=a.seed)
    results = {'pretrain_top1': r['top1'], 'model_params': count_params(model)}
    for mode in ('linear', 'full', 'mixture'):  # mixture last: its model keeps the new task for the plots
        m = copy.deepcopy(model)
        frozen = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(('bank.', 'stem.'))}
        torch.manual_seed(a.seed)
        res = transfer(m, held['name'], held['classes'], train, val, mode=mode, init_from=a.init_from, **fit)
        after = m.state_dict()
        res['bank_unchanged'] = all(torch.equal(v, after[k]) for k, v in frozen.items())
        res['params_after'] = count_params(m)
        results[mode] = {k: v for k, v in res.items() if k != 'history'}
        print(mode, results[mode], flush=True)
        if mode == 'mixture':
            assert res['bank_unchanged'], 'mixture-only transfer changed the bank or stem'
            alphas = m.alphas()
            plot_task_mixtures(alphas, out_dir / 'transfer-mixtures.png', title=f'alpha after adding {held["name"]}')
            plot_sharing(alphas, out_dir / 'transfer-sharing.png')
            results['js_per_layer'] = js_sharing(alphas).tolist()
    names = {'mixture': 'new mixture + head (bank frozen)', 'linear': 'linear probe (head only)',
             'full': 'full fine-tuning'}
    lines = [f'| transfer to {held["name"]} | top-1 | trainable params | bank unchanged |', '|---|---|---|---|']
    for mode in ('mixture', 'linear', 'full'):
        x = results[mode]
        lines.append(f'| {names[mode]} | {x["top1"]:.1f} | {x["trainable"]:,} | {x["bank_unchanged"]} |')
    lines.append(f'\npretrained on {", ".join(r["top1"])} (top-1 {", ".join(f"{v:.1f}" for v in r["top1"].values())}); '
                 f'model params {results["model_params"]:,}; plots in {out_dir}')
    table = '\n'.join(lines)
    print(table)
    Path(a.out, 'transfer-results.md').write_text(table + '\n')
    Path(a.out, 'transfer-results.json').write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
