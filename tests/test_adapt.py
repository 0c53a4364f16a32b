"""Transfer and domain adaptation: only the new task's mixture (and head) learn; the bank stays bit-for-bit."""
import math

import pytest
import timm
import torch
from torch.utils.data import TensorDataset

import timm_isomix  # noqa: F401  (registers the models)
from timm_isomix.tasks.adaptation import (
    adapt_target, adaptation_loss, label_free_score, loss_decreased, moment_distance, select_candidate,
    sliced_wasserstein)
from timm_isomix.tasks.transfer import freeze_for_transfer, reestimate_stats, transfer
from timm_isomix.models.multitask import MultiTaskIsoMix, count_params

TINY = dict(width=8, depth=4, num_templates=2, patch_size=4, zero_init_last=False)


pytestmark = pytest.mark.usefixtures('one_thread')


def trained_like_model() -> MultiTaskIsoMix:
    torch.manual_seed(0)
    trunk = timm.create_model('isomix_iso_64_8_p2', num_classes=0, **TINY)
    return MultiTaskIsoMix(trunk, {'src': 3}, init_logit=2.0)


def toy_data(n=48, classes=3, size=16, seed=0):
    """Images whose brightness gives the class: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, size, size, generator=g) * 0.3 + (y.float() - 1).view(-1, 1, 1, 1)
    return TensorDataset(x, y)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, model, params_only=True):
    names = {n for n, _ in model.named_parameters()} if params_only else set(before)
    after = model.state_dict()
    return sorted(k for k in names if k in before and not torch.equal(before[k], after[k]))


FIT = dict(epochs=2, lr=0.02, batch_size=16)


def test_mixture_transfer_leaves_the_templates_bit_for_bit_unchanged_and_trains_only_logits_and_head():
    model = trained_like_model()
    before = snapshot(model)
    res = transfer(model, 'new', 3, toy_data(), toy_data(seed=1), mode='mixture', init_from='src', **FIT)
    assert changed(before, model) == []  # nothing that existed before: bank, stem, the source task
    after = model.state_dict()
    for k in [k for k in before if k.startswith(('bank.', 'stem.', 'tasks.src.'))]:
        assert torch.equal(before[k], after[k]), k  # buffers (statistics) of the source included
    new = model.tasks['new']
    assert not torch.equal(new.schedules[0].mixture.logits, model.tasks['src'].schedules[0].mixture.logits)
    assert res['trainable'] == 4 * 2 + 8 * 3 + 3 == res['task_params']
    assert res['trainable'] < count_params(model) / 20
    assert all(p.requires_grad for p in model.parameters())  # freezing is undone afterwards


# What learns in each mode (names under tasks.new); the statistics are re-estimated in all but one.
LEARNS = {
    'mixture_frozen_stats': {'schedules.0.mixture.logits', 'head.weight', 'head.bias'},
    'mixture': {'schedules.0.mixture.logits', 'head.weight', 'head.bias'},
    'stats': set(),
    'linear': {'head.weight', 'head.bias'},
    'patch': {'patch_stem', 'patch_layers', 'head.weight', 'head.bias'},
    'mixture_patch': {'schedules.0.mixture.logits', 'patch_stem', 'patch_layers', 'head.weight', 'head.bias'},
}


@pytest.mark.parametrize('mode', list(LEARNS))
def test_a_transfer_mode_trains_what_it_names_and_nothing_that_existed_before(mode):
    model = trained_like_model()
    with torch.no_grad():
        model.tasks['src'].stem_stats.running_mean.fill_(0.5)  # source statistics unlike the new data's
    before = snapshot(model)
    src = model.tasks['src']
    start = {'schedules.0.mixture.logits': src.schedules[0].mixture.logits, 'head.weight': src.head.weight,
             'head.bias': src.head.bias, 'patch_stem': torch.stack([model.stem.bn.weight, model.stem.bn.bias]),
             'patch_layers': src.alpha() @ model.bank.affine}
    res = transfer(model, 'new', 3, toy_data(), toy_data(seed=1), mode=mode, init_from='src', **FIT)
    assert changed(before, model, params_only=False) == []  # bank, stem, source task: parameters and statistics
    new = dict(model.tasks['new'].named_parameters())
    assert res['trainable'] == sum(new[n].numel() for n in LEARNS[mode])
    moved = {n for n in start if n in new and not torch.allclose(new[n], start[n])}
    assert moved == LEARNS[mode]
    kept = torch.equal(model.tasks['new'].stem_stats.running_mean, src.stem_stats.running_mean)
    assert kept == (mode == 'mixture_frozen_stats')
    assert res['top1'] is not None and (res['history'] == []) == (mode == 'stats')


def test_a_mode_that_trains_no_head_needs_a_source_head_of_the_same_classes():
    model = trained_like_model()
    with pytest.raises(ValueError, match="trains no head, so it runs 'src'.*3 classes; task 'new' has 5"):
        transfer(model, 'new', 5, toy_data(), mode='stats', init_from='src')


def test_full_finetuning_changes_the_bank():
    model = trained_like_model()
    before = snapshot(model)
    res = transfer(model, 'new', 3, toy_data(), mode='full', init_from='src', **FIT)
    assert 'bank.weight' in changed(before, model)
    assert res['trainable'] > count_params(model.bank)


def test_unknown_transfer_mode_is_rejected():
    model = trained_like_model()
    with pytest.raises(ValueError, match="unknown transfer mode 'all'"):
        freeze_for_transfer(model, 'src', 'all')


def adaptation_setup():
    model = trained_like_model()
    model.add_task('tgt', 3, init_from='src', share_head_with='src')
    target = TensorDataset(toy_data(seed=2).tensors[0] * 2 + 0.5)  # unlabelled, shifted domain
    return model, target, {'src': TensorDataset(toy_data().tensors[0])}


@pytest.mark.parametrize('align', ['mm', 'mm_balanced', 'adversarial', 'swd', 'none'])
def test_adaptation_changes_only_the_target_mixture_logits(align):
    model, target, sources = adaptation_setup()
    before = snapshot(model)
    hist = adapt_target(model, 'tgt', target, sources, steps=5, lr=0.1, batch_size=16, align=align)
    assert changed(before, model) == ['tasks.tgt.schedules.0.mixture.logits']
    # Statistics that moved are the target's own; the source's are untouched.
    moved = changed(before, model, params_only=False)
    assert all(k.startswith('tasks.tgt.') for k in moved) and len(moved) > 1
    assert [h['step'] for h in hist] == [1, 2, 3, 4, 5]  # one record per step: the loss curve
    assert set(hist[-1]) >= {'loss', 'im', 'entropy', 'diversity', 'align'}
    assert ('discriminator' in hist[-1]) == (align == 'adversarial')


def test_adaptation_without_adabn_keeps_the_statistics_the_target_was_given():
    model, target, sources = adaptation_setup()
    before = snapshot(model)
    adapt_target(model, 'tgt', target, sources, steps=3, lr=0.1, batch_size=16, stats='source')
    assert changed(before, model, params_only=False) == ['tasks.tgt.schedules.0.mixture.logits']


def test_the_adaptation_objective_decreases_on_a_shifted_domain():
    model, target, sources = adaptation_setup()
    hist = adapt_target(model, 'tgt', target, sources, steps=40, lr=0.2, batch_size=48, align='mm_balanced')
    assert loss_decreased(hist)


def test_adapting_with_no_target_data_is_a_clear_error():
    model = trained_like_model()
    model.add_task('tgt', 3, init_from='src', share_head_with='src')
    with pytest.raises(ValueError, match="adapting task 'tgt' needs unlabelled target data"):
        adapt_target(model, 'tgt', TensorDataset(torch.empty(0, 3, 16, 16)))
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        adapt_target(model, 'nope', toy_data())


def test_reestimated_statistics_are_the_average_over_the_target_data():
    model = trained_like_model()
    data = toy_data(n=40)
    reestimate_stats(model, 'src', data, batch_size=10)  # 4 equal batches: mean of batch means = data mean
    with torch.no_grad():
        feats = model.stem.conv(data.tensors[0])
    assert torch.allclose(model.tasks['src'].stem_stats.running_mean, feats.mean((0, 2, 3)), atol=1e-5)


def test_information_maximisation_prefers_confident_and_diverse_predictions():
    f = torch.randn(8, 4)
    confident = torch.eye(4).repeat(2, 1)
    uniform = torch.full((8, 4), 0.25)
    collapsed = torch.eye(4)[[0] * 8]
    loss = {name: adaptation_loss(p, f, [], align='none')['loss'] for name, p in
            (('confident', confident), ('uniform', uniform), ('collapsed', collapsed))}
    assert loss['confident'] < loss['uniform'] and loss['confident'] < loss['collapsed']
    assert torch.isclose(loss['confident'], -torch.log(torch.tensor(4.)))  # entropy 0, diversity log 4


def test_moment_distance_sees_shifted_means_and_spreads_and_ignores_the_order_of_samples():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(256, 4, generator=g)
    same = f[torch.randperm(256, generator=g)]
    assert moment_distance(f, [same]) < 1e-9  # the same samples in another order
    assert moment_distance(f, [f + 1]) > 1 and moment_distance(f, [f * 3]) > 1  # mean; second moment
    other = torch.randn(256, 4, generator=g)  # another draw of the same distribution: small, not zero
    assert 0 < moment_distance(f, [other]) < 0.1 * moment_distance(f, [f + 1])
    # the authors' form: 1/2 ||mean difference||^2 + 1/2 ||second moment difference||^2
    expected = 0.5 * 4 * 1 ** 2 + 0.5 * ((2 * f.mean(0) + 1) ** 2).sum()
    assert torch.isclose(moment_distance(f, [f + 1]), expected)


def test_balanced_moment_distance_does_not_change_with_the_scale_of_the_features():
    g = torch.Generator().manual_seed(0)
    f, s = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g) + 0.5
    assert torch.isclose(moment_distance(f, [s], balanced=True), moment_distance(100 * f, [100 * s], balanced=True),
                         rtol=1e-3)
    assert not torch.isclose(moment_distance(f, [s]), moment_distance(100 * f, [100 * s]))


def test_sliced_wasserstein_is_zero_for_the_same_samples_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(128, 4, generator=g)
    assert sliced_wasserstein(f, [f.flip(0)], generator=g) < 1e-9
    near, far = (sliced_wasserstein(f, [f + d], generator=torch.Generator().manual_seed(1)) for d in (0.5, 2.))
    assert 0 < near < far


def test_adversarial_alignment_needs_a_discriminator():
    with pytest.raises(ValueError, match='needs a DomainDiscriminator'):
        adaptation_loss(torch.full((2, 3), 1 / 3), torch.randn(2, 4), [torch.randn(2, 4)], align='adversarial')
    with pytest.raises(ValueError, match="unknown alignment 'mmd'"):
        adaptation_loss(torch.full((2, 3), 1 / 3), torch.randn(2, 4), [], align='mmd')


def test_selection_takes_the_lowest_label_free_score_among_runs_whose_objective_decreased():
    down, up = [{'loss': 3.}, {'loss': 2.}, {'loss': 1.}], [{'loss': 1.}, {'loss': 2.}, {'loss': 3.}]
    assert loss_decreased(down) and not loss_decreased(up)
    cands = [{'score': -1.0, 'decreased': False}, {'score': -0.5, 'decreased': True}, {'score': -0.2, 'decreased': True}]
    assert select_candidate(cands) == 1
    assert select_candidate([{'score': 0.3, 'decreased': False}, {'score': 0.1, 'decreased': False}]) == 1


def test_label_free_score_reads_images_only():
    model, target, _ = adaptation_setup()
    score = label_free_score(model, 'tgt', target)  # a dataset without labels
    assert -math.log(3) - 1e-6 <= score <= math.log(3)
