"""Model summaries: parameters, MACs, executed layers and templates of the registered isomix models.

`python -m timm_isomix.tools.summary` prints README's model table (markdown).
"""
import argparse
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import timm

__all__ = ['count_macs', 'model_table']


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-accumulates of one eval forward pass on one image of `input_size` (C, H, W).

    Counted with torch.utils.flop_counter (convolutions and matrix products, the mixing of templates
    included); MACs = FLOPs / 2.
    """
    from torch.utils.flop_counter import FlopCounterMode
    params = list(model.parameters())
    device = params[0].device if params else 'cpu'
    was_training, requires_grad = model.training, [p.requires_grad for p in params]
    # FlopCounterMode hooks backward on module outputs; a hard order passes a template (a parameter view)
    # through unchanged, which it cannot hook, so counting runs with gradients off
    for p in params:
        p.requires_grad_(False)
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for p, r in zip(params, requires_grad):
            p.requires_grad_(r)
    return counter.get_total_flops() // 2


def model_table(names: Optional[List[str]] = None) -> str:
    """Markdown table: model, input, parameters, GMACs, executed layers and templates per bank."""
    import timm_isomix  # noqa: F401  (registers the models)
    rows = ['| model | input | params (M) | GMACs | executed layers per bank | templates per bank |',
            '|---|---|---|---|---|---|']
    for name in names or timm.list_models('isomix_*'):
        model = timm.create_model(name)
        size = model.pretrained_cfg['input_size']
        mixtures = list(model.mixtures().values())
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append(
            f'| `{name}` | {size[-1]} | {params:.2f} | {count_macs(model, size) / 1e9:.2f} | '
            f'{", ".join(str(m.num_layers) for m in mixtures)} | {", ".join(str(m.num_templates) for m in mixtures)} |')
    return '\n'.join(rows)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='*', help='model names (default: every isomix_* model)')
    print(model_table(parser.parse_args(argv).models or None))


if __name__ == '__main__':
    main()
