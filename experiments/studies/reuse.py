"""Higher accuracy at no parameter increase by reusing the same block several times: at a fixed parameter
count, does running each template more often (reuse) raise accuracy?

One bank of K = 4 templates (isometric net, width 48, 8x8 tokens) executed K, 2K or 3K times with
learned mixtures; a hard cyclic order at reuse 2 (reuse without mixing); and the unshared network of
depth 2K (8 templates run once each: what twice the parameters buy). Same recipe and epochs for all.
"""
from ..classify import train_classifier
from ..runner import Scale, Study, register

K = 4
# The mixture start and learning-rate multiplier the mixture-dynamics study chose (docs/results.md).
MIXTURE = dict(mixture_init='random')
MIXTURE_LR_MULT = 10.
# Full size (GPU): all 50,000 training and 10,000 validation images; the trunk widened to 128 channels on 16x16
# tokens (patch 2), the same trunk at every reuse; a fast recipe after ConvMixer's CIFAR-10 script (Trockman &
# Kolter, "Patches Are All You Need?", an isometric net on 16x16 tokens, about 92.5 % in 25 epochs): 25 epochs,
# batch 512, AdamW at lr 0.01 and weight decay 0.01, 10 warm-up epochs; then the loop's cosine decay, its random
# crop and flip and the study's label smoothing (ConvMixer adds RandAugment and random erasing).
FULL = Scale(epochs=25, train_limit=None, val_limit=None, batch_size=512,
             overrides=dict(model_kwargs=dict(width=128, patch_size=2), lr=0.01, weight_decay=0.01, warmup_epochs=10))


def _configs(data: str):
    base = dict(model='isomix_iso_64_8_p2', data=data, mixture_lr_mult=MIXTURE_LR_MULT)
    trunk = dict(width=48, patch_size=4, num_templates=K)
    return {
        'reuse1': dict(base, model_kwargs=dict(trunk, depth=K, **MIXTURE)),
        'reuse2': dict(base, model_kwargs=dict(trunk, depth=2 * K, **MIXTURE)),
        'reuse3': dict(base, model_kwargs=dict(trunk, depth=3 * K, **MIXTURE)),
        'reuse2-hard-cyclic': dict(base, model_kwargs=dict(trunk, order=[l % K for l in range(2 * K)])),
        'unshared-depth8': dict(base, model_kwargs=dict(trunk, num_templates=2 * K, order=list(range(2 * K)))),
    }


for data, classes in (('miniimagenet32', 100), ('cifar10', 10)):
    register(Study(
        name=f'reuse-{data}',
        description=f'Reusing the same block several times at no parameter increase, on {data} ({classes} '
                    f'classes; 15k training images, 4 epochs): reuse 1, 2, 3 of '
                    f'K={K} templates at equal parameters, a hard cyclic order, and the unshared depth-{2 * K} net.',
        configs=_configs(data),
        run=train_classifier,
        scale=Scale(epochs=4, train_limit=15000, val_limit=5000, batch_size=64),
        presets={'full': FULL},
    ))
