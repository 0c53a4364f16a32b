"""Mixture dynamics: do the mixtures move away from where they start, and which start lets them?

One isometric net (width 64, 8x8 tokens, K = 4 templates, 8 executed layers: reuse 2) on a CIFAR-10
subset; the configurations differ only in how the logits start (`mixture_init`: the authors' U(0, 1),
uniform with small noise, soft cyclic (logit 4), sharp cyclic (logit 16)), the mixture learning-rate
multiplier and the softmax temperature. The defaults are chosen from these numbers (docs/results.md).
"""
from ..classify import train_classifier
from ..runner import Scale, Study, register
from .reuse import FULL as REUSE_FULL

TRUNK = dict(width=64, patch_size=4, num_templates=4, depth=8)


def _config(init: str, mult: float, init_logit: float = 4.0, temperature: float = 1.0):
    kwargs = dict(TRUNK, mixture_init=init, init_logit=init_logit, temperature=temperature)
    return dict(model='isomix_iso_64_8_p2', model_kwargs=kwargs, data='cifar10', mixture_lr_mult=mult)


register(Study(
    name='mixtures-cifar10',
    description='Mixture dynamics on CIFAR-10 (10k training images, 4 epochs): initialisation, mixture '
                'learning-rate multiplier, temperature; isometric net, K=4 templates, 8 layers.',
    configs={
        'random-m10': _config('random', 10.),
        'uniform-m10': _config('uniform', 10.),
        'cyclic4-m10': _config('cyclic', 10., init_logit=4.),
        'cyclic16-m10': _config('cyclic', 10., init_logit=16.),
        'random-m1': _config('random', 1.),
        'random-m10-t0.5': _config('random', 10., temperature=0.5),
    },
    run=train_classifier,
    scale=Scale(epochs=4, train_limit=10000, val_limit=2000, batch_size=64),
    presets={'full': REUSE_FULL},  # the reuse study's full size: trunk at 128 channels on 16x16 tokens, its recipe
))
