"""Tasks as adapters over staged and isometric backbones: per-task norms, where new tasks start, the adapter
files and their refusals, mixed-task batches, and baking a task into plain timm modules."""
import copy
import hashlib
import json
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import timm_isomix
from timm_isomix import MultiTaskIsoMix, resnet_to_isomix
from timm_isomix.bank import INIT_LOGIT, SHARP_LOGIT, order_logits
from timm_isomix.hub import PickledWeightsError, PretrainedWeightsError
from timm_isomix.models.task_adapter import (
    CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, BackboneMismatchError, backbone_fingerprint, fingerprint)
from timm_isomix.tasks.transfer import transfer

pytestmark = pytest.mark.usefixtures('one_thread')

SMALL = dict(channels=(8, 16, 32, 64))  # ResNet-50's stages and banks (K = 2, 3, 5, 2) at a fraction of its width
TINY = dict(width=8, depth=4, num_templates=2, patch_size=4, zero_init_last=False)
BACKBONES = {'staged': ('isomix_resnet50', SMALL), 'isometric': ('isomix_iso_64_8_p2', TINY)}


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                if m.affine:
                    m.weight.normal_(1, 0.2)
                    m.bias.normal_(0, 0.1)


def backbone(kind, seed=0, **kwargs):
    torch.manual_seed(seed)
    arch, args = BACKBONES[kind]
    b = timm.create_model(arch, num_classes=0, **{**args, **kwargs})
    _randomize_bn(b)  # statistics and scales unlike the defaults: a wrong one shows in the outputs
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero-init residual branch: every template counts
    return b


def warm_started(name='resnet50', seed=0):
    """A timm ResNet (random init, random statistics) and the isomix model warm-started from it, as
    pretrained=True builds it: the hard identity order."""
    torch.manual_seed(seed)
    resnet = timm.create_model(name, num_classes=7, **SMALL).eval()
    _randomize_bn(resnet)
    layers = [len(getattr(resnet, f'layer{i}')) for i in range(1, 5)]
    model = timm.create_model(f'isomix_{name}', num_classes=7, order=[list(range(n - 1)) for n in layers], **SMALL)
    model.load_state_dict(resnet_to_isomix(resnet.state_dict(), model))
    fc = model.fc
    model.reset_classifier(0)
    return resnet, model, fc


def task_of_warm_start(name='resnet50'):
    resnet, b, fc = warm_started(name)
    m = MultiTaskIsoMix(b, {'in1k': 7})
    m.tasks['in1k'].head.load_state_dict(fc.state_dict())
    return resnet, m.eval()


# --- tasks over both families ----------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['resnet26', 'resnet50'])
def test_a_task_on_the_warm_starts_schedule_computes_the_resnet(name):
    resnet, m = task_of_warm_start(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = resnet(x)
        torch.testing.assert_close(m(x, task='in1k'), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    k = [s.bank.num_templates for s in m.stages]
    for s, n in zip(m.tasks['in1k'].schedules, k):  # the hard order, as sharp logits
        assert torch.equal(s.mixture.logits, order_logits(range(n), n, SHARP_LOGIT))


def test_a_new_task_over_a_warm_start_starts_at_its_order_with_a_moderate_logit_and_learns():
    _, m = task_of_warm_start()
    new = m.add_task('new', 5)
    also = m.add_task('from_in1k', 5, init_from='in1k')
    soft = m.add_task('soft', 5, init_logit=1.0)
    for s, t, u in zip(new.schedules, also.schedules, soft.schedules):
        k = s.mixture.num_templates
        assert torch.equal(s.mixture.logits, order_logits(range(k), k, INIT_LOGIT))
        assert torch.equal(t.mixture.logits, s.mixture.logits)
        assert torch.equal(u.mixture.logits, order_logits(range(k), k, 1.0))
    m.train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    alpha = {t: m.tasks[t].alpha()[:2].clone() for t in ('new', 'in1k')}
    logits = [s.mixture.logits for t in ('new', 'in1k') for s in m.tasks[t].schedules]
    opt = torch.optim.SGD(logits, lr=1.0)
    loss = F.cross_entropy(m(x, task='new'), y) + F.cross_entropy(m(x, task='in1k')[:, :5], y)
    loss.backward()
    assert m.tasks['new'].schedules[0].mixture.logits.grad.abs().max() > 1e-4  # gradients reach the new logits
    assert m.tasks['in1k'].schedules[0].mixture.logits.grad.abs().max() < 1e-5  # saturated: next to none
    opt.step()
    assert (m.tasks['new'].alpha()[:2] - alpha['new']).abs().max() > 1e-4  # alpha moved after one step
    assert (m.tasks['in1k'].alpha()[:2] - alpha['in1k']).abs().max() < 1e-6


def test_over_a_staged_backbone_each_task_owns_the_statistics_of_the_stem_and_unbanked_blocks():
    m = MultiTaskIsoMix(backbone('staged'), {'a': 3, 'b': 4}).train()
    shared = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith('tasks.')}
    b_state = {k: v.clone() for k, v in m.tasks['b'].state_dict().items()}
    m(torch.randn(4, 3, 32, 32) * 2 + 1, task='a')
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in shared.items())  # the backbone's buffers too
    assert all(torch.equal(v, m.tasks['b'].state_dict()[k]) for k, v in b_state.items())
    a_stats = m.tasks['a'].state_dict()
    for key in ('stem_stats.running_mean', 'blocks.0.norms.bn1.running_mean', 'blocks.3.norms.downsample.running_var',
                'schedules.2.layers.9.bn3.running_mean'):
        assert not torch.equal(a_stats[key], b_state[key]), key
    names = [n for n, _ in m.named_parameters()]
    assert names.count('stages.2.bank.weight') == 1 and 'conv1.weight' in names and 'stages.0.first.conv1.weight' in names
    counts = m.param_counts()
    assert counts['own']['a'] == sum(s.mixture.logits.numel() for s in m.tasks['a'].schedules) + 256 * 3 + 3


def test_a_patched_staged_task_starts_as_its_source_and_runs_its_own_scale_and_shift():
    m = MultiTaskIsoMix(backbone('staged'), {'a': 3}).eval()
    x = torch.randn(2, 3, 32, 32)
    before = m(x, task='a')
    p = m.add_task('p', 3, init_from='a', patch=True)
    p.head.load_state_dict(m.tasks['a'].head.state_dict())
    torch.testing.assert_close(m(x, task='p'), before, rtol=1e-5, atol=1e-5)
    affine = sum(s.num_layers * b.affine.shape[1] for s, b in zip(p.schedules, m.banks()))
    assert p.patch_layers.shape == (affine,) and p.blocks[0].patch_norms.shape[0] == 2
    assert len(p.patch_parameters()) == 2 + len(m.stages)
    out = m(x, task='p')
    with torch.no_grad():
        m.bn1.weight.mul_(3)
        m.stages[1].first.bn2.bias.add_(1)
        m.stages[2].bank.affine.mul_(2)  # the shared scale and shift no longer reach a patched task
    assert torch.equal(m(x, task='p'), out) and not torch.allclose(m(x, task='a'), before)


def test_what_needs_one_bank_or_an_isomix_backbone_is_refused_clearly():
    with pytest.raises(ValueError, match='share_from must be a layer index .* one bank'):
        MultiTaskIsoMix(backbone('staged'), {'a': 3}, share_from=0)
    m = MultiTaskIsoMix(backbone('staged'), {'a': 3})
    with pytest.raises(ValueError, match='own_trunk .* needs an isometric backbone'):
        m.add_task('b', 3, own_trunk=True)
    with pytest.raises(ValueError, match='needs an isomix backbone .* got ResNet'):
        MultiTaskIsoMix(timm.create_model('resnet18', num_classes=0), {'a': 3})
    with pytest.raises(ValueError, match='routed backbone'):
        MultiTaskIsoMix(timm.create_model('isomix_iso_64_8_p2', num_classes=0, routing='task', **TINY), {'a': 3})


def test_transfer_over_a_staged_backbone_trains_only_the_new_task_and_leaves_the_backbone_bit_identical():
    from torch.utils.data import TensorDataset
    m = MultiTaskIsoMix(backbone('staged'), {'src': 3})
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.arange(16) % 3)
    res = transfer(m, 'new', 3, data, data, mode='mixture_patch', epochs=1, lr=0.05, batch_size=8)
    after = m.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    new = m.tasks['new']
    assert not torch.equal(new.schedules[2].mixture.logits, m.tasks['src'].schedules[2].mixture.logits)
    assert res['trainable'] == res['task_params'] == sum(p.numel() for p in new.parameters())


# --- adapters ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('arch', ['isomix_resnet26', 'isomix_iso_64_8_p2'])
def test_the_acceptance_calls_save_an_adapter_that_loads_onto_a_copy_of_the_backbone(arch, tmp_path):
    b = timm.create_model(arch, num_classes=0)
    copy1, copy2 = copy.deepcopy(b), copy.deepcopy(b)
    folder = str(tmp_path / 'b')
    m = timm_isomix.MultiTaskIsoMix(copy1, {'a': 10}); m.add_task('b', 10, patch=True); m.save_task('b', folder)
    m2 = timm_isomix.MultiTaskIsoMix(copy2, {'a': 10}); m2.load_task(folder)
    x = torch.randn(4, 3, 32, 32)
    m.eval(), m2.eval()
    with torch.no_grad():
        features = m.forward_features(x, task=['a', 'b', 'b', 'a'])
        torch.testing.assert_close(features[[0, 3]], m.forward_features(x, task='a')[[0, 3]])
        torch.testing.assert_close(features[[1, 2]], m.forward_features(x, task='b')[[1, 2]])
        assert torch.equal(m2(x, task='b'), m(x, task='b'))


@pytest.mark.parametrize('kind', list(BACKBONES))
def test_an_adapter_holds_only_what_the_task_owns_and_names_its_backbone(kind, tmp_path):
    b = backbone(kind)
    plain_fingerprint = backbone_fingerprint(b)
    m = MultiTaskIsoMix(b, {'a': 3})
    m.add_task('b', 4, patch=True)
    m.save_task('b', tmp_path, label_names=['w', 'x', 'y', 'z'], results={'top1': 50.0})
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(tensors) == set(m.tasks['b'].state_dict())  # no bank, stem or unbanked block
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config['format_version'] == FORMAT_VERSION and config['task'] == 'b' and config['num_classes'] == 4
    assert config['label_names'] == ['w', 'x', 'y', 'z'] and config['results'] == {'top1': 50.0}
    assert set(config['owns']) == {'mixtures', 'statistics', 'patch', 'head'} and config['owns']['head'] == m.num_features * 4 + 4
    assert config['backbone']['fingerprint'] == plain_fingerprint == m.fingerprint()
    assert set(config['data_config']) >= {'input_size', 'mean', 'std', 'interpolation'}
    arch, model_args = config['backbone']['architecture'], config['backbone']['model_args']
    rebuilt = MultiTaskIsoMix(timm.create_model(arch, num_classes=0, **model_args), {})
    shapes = {n: p.shape for n, p in m.shared_parameters().items()}
    assert {n: p.shape for n, p in rebuilt.shared_parameters().items()} == shapes
    rebuilt.load_task(str(tmp_path), allow_other_backbone=True)  # same shapes and schedule: it loads
    assert rebuilt.task_info['b']['label_names'] == ['w', 'x', 'y', 'z']


def test_the_fingerprint_is_sha256_over_sorted_names_shapes_and_little_endian_float32():
    tensors = {'b.w': torch.tensor([[1.5, -2.0]]), 'a': torch.tensor([0.25], dtype=torch.float64)}
    h = hashlib.sha256()
    h.update(b'a:1\n' + bytes.fromhex('0000803e'))  # 0.25 as little-endian float32
    h.update(b'b.w:1,2\n' + bytes.fromhex('0000c03f') + bytes.fromhex('000000c0'))
    assert fingerprint(tensors) == 'sha256:' + h.hexdigest()


@pytest.mark.parametrize('kind', list(BACKBONES))
def test_a_backbone_with_other_weights_is_refused_naming_both_fingerprints_unless_allowed(kind, tmp_path):
    m = MultiTaskIsoMix(backbone(kind, seed=0), {'a': 3})
    m.add_task('b', 3)
    m.save_task('b', tmp_path)
    other = MultiTaskIsoMix(backbone(kind, seed=1), {'a': 3})
    with pytest.raises(BackboneMismatchError, match=f'{m.fingerprint()}.*{other.fingerprint()}.*allow_other_backbone'):
        other.load_task(str(tmp_path))
    assert list(other.tasks) == ['a']
    other.load_task(str(tmp_path), name='b2', allow_other_backbone=True)
    assert torch.equal(other.tasks['b2'].head.weight, m.tasks['b'].head.weight)


def test_an_adapter_of_another_architecture_or_schedule_is_refused(tmp_path):
    m = MultiTaskIsoMix(backbone('isometric'), {'a': 3})
    m.save_task('a', tmp_path)
    with pytest.raises(PretrainedWeightsError, match="'isomix_iso_64_8_p2', this model's backbone is 'isomix_resnet50'"):
        MultiTaskIsoMix(backbone('staged'), {}).load_task(str(tmp_path))
    deeper = MultiTaskIsoMix(backbone('isometric', depth=6), {})
    with pytest.raises(PretrainedWeightsError, match=r'runs \[4\] executed layers per bank, this backbone \[6\]'):
        deeper.load_task(str(tmp_path))


def test_a_truncated_adapter_or_a_pickle_is_refused_with_the_hub_errors(tmp_path):
    m = MultiTaskIsoMix(backbone('isometric'), {'a': 3})
    good = m.save_task('a', tmp_path / 'good')
    truncated = tmp_path / 'truncated'
    m.save_task('a', truncated)
    data = (truncated / WEIGHTS_NAME).read_bytes()
    (truncated / WEIGHTS_NAME).write_bytes(data[:len(data) // 2])
    with pytest.raises(PretrainedWeightsError, match='not a valid safetensors file, truncated or corrupted'):
        m.load_task(str(truncated), name='t')
    pickled = tmp_path / 'pickled'
    pickled.mkdir()
    (pickled / CONFIG_NAME).write_text((tmp_path / 'good' / CONFIG_NAME).read_text())
    torch.save(m.tasks['a'].state_dict(), pickled / 'adapter_model.bin')
    with pytest.raises(PickledWeightsError, match='adapter_model.bin .* safetensors only'):
        m.load_task(str(pickled), name='p')
    with pytest.raises(PickledWeightsError, match='a pickle; task adapters are read from safetensors only'):
        m.load_task(str(pickled / 'adapter_model.bin'), name='p')
    with pytest.raises(PretrainedWeightsError, match='not a task adapter folder'):
        m.load_task(str(tmp_path / 'missing'), name='p')
    config = json.loads((truncated / CONFIG_NAME).read_text())
    (truncated / CONFIG_NAME).write_text(json.dumps({k: v for k, v in config.items() if k != 'num_classes'}))
    with pytest.raises(PretrainedWeightsError, match=r"lacks \['num_classes'\]"):
        m.load_task(str(truncated), name='t')
    assert list(m.tasks) == ['a'] and m.load_task(good, name='again').num_classes == 3


def test_tasks_that_do_not_own_their_path_cannot_be_saved_and_label_names_must_fit(tmp_path):
    m = MultiTaskIsoMix(backbone('isometric'), {'a': 3}, share_from=2)
    with pytest.raises(ValueError, match='runs the mixture all tasks share'):
        m.save_task('a', tmp_path)
    m = MultiTaskIsoMix(backbone('isometric'), {'a': 3})
    m.add_task('own', 3, own_trunk=True)
    with pytest.raises(ValueError, match='runs its own trunk'):
        m.save_task('own', tmp_path)
    with pytest.raises(ValueError, match='3 classes but 2 label names'):
        m.save_task('a', tmp_path, label_names=['x', 'y'])


# --- mixed-task batches ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('kind', list(BACKBONES))
def test_a_mixed_batch_equals_the_per_task_forwards_in_eval(kind):
    m = MultiTaskIsoMix(backbone(kind), {'a': 3, 'b': 5})
    m.add_task('c', 2, patch=True)
    m.eval()
    x = torch.randn(7, 3, 32, 32)
    tasks = ['b', 'a', 'c', 'b', 'c', 'a', 'b']
    index = torch.tensor([list(m.tasks).index(t) for t in tasks])
    with torch.no_grad():
        per_task = {t: m(x, task=t) for t in m.tasks}
        for t_arg in (tasks, index):
            out = m(x, task=t_arg)
            assert out.shape == (7, 5)
            for i, t in enumerate(tasks):
                n = m.tasks[t].num_classes
                torch.testing.assert_close(out[i, :n], per_task[t][i])
                assert torch.isinf(out[i, n:]).all() and (out[i, n:] < 0).all()
            assert (out.softmax(-1)[[0, 3, 6], :5].sum(-1) - 1).abs().max() < 1e-5
            assert out.argmax(-1)[2] < 2 and out.softmax(-1)[2, 2:].eq(0).all()
        feats = m.forward_features(x, task=tasks)
        torch.testing.assert_close(m.forward_head(feats, task=tasks), m(x, task=tasks))
        torch.testing.assert_close(feats[[1, 5]], m.forward_features(x, task='a')[[1, 5]])
        assert torch.equal(m(x, task=['a'] * 7), per_task['a'])


def _distinct_tasks(m):
    """Every task's logits, statistics and patch made its own: a task run with another's shows in the outputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for path in m.tasks.values():
            _randomize_bn(path)
            for p in path.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


@pytest.mark.parametrize('share_from', [None, 2])
def test_in_eval_an_isometric_backbones_mixed_batch_runs_its_tasks_side_by_side_as_their_own_forwards(share_from):
    m = MultiTaskIsoMix(backbone('isometric'), {'a': 3, 'b': 5}, share_from=share_from)
    m.add_task('c', 2, patch=True)
    _distinct_tasks(m)
    x = torch.randn(11, 3, 32, 32)
    tasks = ['b', 'a', 'c', 'b', 'c', 'a', 'b', 'a', 'c', 'b', 'a']  # groups of 4, 4 and 3: one example of padding
    with torch.no_grad():
        per_task = {t: m(x, task=t) for t in m.tasks}
        assert m.side_by_side._cache is None
        out = m(x, task=tasks)
        wide = m.side_by_side._cache
        assert wide is not None and all(layer.groups == 3 for layer in wide[5])
        for i, t in enumerate(tasks):
            torch.testing.assert_close(out[i, :m.tasks[t].num_classes], per_task[t][i], rtol=1e-5, atol=1e-5)
        assert torch.equal(m(x, task=tasks), out) and m.side_by_side._cache is wide  # built once
        two = ['c', 'a'] * 5 + ['c']
        torch.testing.assert_close(m.forward_features(x, task=two)[1::2], m.forward_features(x, task='a')[1::2],
                                   rtol=1e-5, atol=1e-5)
        assert m.side_by_side._cache[0][0] == ('a', 'c')
        m.bank.weight.mul_(1.5)  # in place: the wide layers are built again
        changed = m(x, task=tasks)
        torch.testing.assert_close(changed[0], m(x, task='b')[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed, out)


def test_mixed_batches_are_grouped_by_task_where_side_by_side_does_not_apply():
    x = torch.randn(8, 3, 32, 32)
    m = MultiTaskIsoMix(backbone('isometric'), {'a': 3, 'b': 3})
    m.add_task('own', 3, own_trunk=True)
    _distinct_tasks(m)
    with torch.no_grad():
        m(x, task=['a'] * 7 + ['b'])  # 6 padded examples for 8: more than a quarter of the batch
        m(x, task=['a', 'own'] * 4)  # a task with its own trunk
        m.train()
        m(x, task=['a', 'b'] * 4)  # training normalizes each group with its own batch statistics
        m.eval()
    m(x, task=['a', 'b'] * 4)  # autograd on
    assert m.side_by_side._cache is None
    staged = _distinct_tasks(MultiTaskIsoMix(backbone('staged'), {'a': 3, 'b': 3}))
    with torch.no_grad():
        staged(x, task=['a', 'b'] * 4)
    assert staged.side_by_side._cache is None


def test_a_mixed_batch_trains_each_task_on_its_own_group():
    m = MultiTaskIsoMix(backbone('isometric'), {'a': 3, 'b': 3}).train()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    F.cross_entropy(m(x, task=['a', 'b'] * 3), y).backward()
    for t in 'ab':
        assert m.tasks[t].head.weight.grad.abs().sum() > 0
        assert m.tasks[t].schedules[0].mixture.logits.grad.abs().sum() > 0


def test_a_task_argument_of_the_wrong_kind_or_length_is_a_clear_error():
    m = MultiTaskIsoMix(backbone('isometric'), {'a': 3, 'b': 3})
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(KeyError, match=r"unknown task 'z'; this model has tasks \['a', 'b'\]"):
        m(x, task=['a', 'z'])
    with pytest.raises(ValueError, match='one name per example, 2 names; got 3'):
        m(x, task=['a', 'b', 'a'])
    with pytest.raises(ValueError, match=r'task indices must be in 0..1'):
        m(x, task=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match='one integer index'):
        m(x, task=torch.tensor([0., 1.]))


def test_in_eval_each_tasks_mixed_rows_are_computed_once_until_a_parameter_changes():
    m = MultiTaskIsoMix(backbone('staged'), {'a': 3, 'b': 3}).eval()
    x = torch.randn(4, 3, 32, 32)
    mixtures = [s.mixture for t in 'ab' for s in m.tasks[t].schedules]
    with torch.no_grad():
        out = m(x, task=['a', 'b', 'a', 'b'])
        rows = [mx._cache[1][0] for mx in mixtures]
        assert torch.equal(m(x, task=['a', 'b', 'a', 'b']), out)
        assert all(mx._cache[1][0] is r for mx, r in zip(mixtures, rows))  # kept, not mixed again
        m.stages[2].bank.weight.mul_(1.5)
        changed = m(x, task=['a', 'b', 'a', 'b'])
    assert not torch.allclose(changed, out)
    assert mixtures[2]._cache[1][0] is not rows[2] and mixtures[0]._cache[1][0] is rows[0]
    m.train()
    assert all(mx._cache is None for mx in mixtures)


# --- bake ----------------------------------------------------------------------------------------------------
def _trained_a_little(kind):
    m = MultiTaskIsoMix(backbone(kind), {'a': 3})
    m.add_task('p', 4, patch=True)
    with torch.no_grad():
        for t in m.tasks.values():
            for p in t.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    m.train()(torch.randn(8, 3, 32, 32), task=['a', 'p'] * 4)  # statistics of their own
    return m.eval()


@pytest.mark.parametrize('kind', list(BACKBONES))
def test_a_baked_task_equals_its_path_with_timm_and_torch_modules_only(kind):
    m = _trained_a_little(kind)
    x = torch.randn(3, 3, 32, 32)
    for task in m.tasks:
        net = m.bake(task)
        assert not net.training
        assert {type(mod).__module__.split('.')[0] for mod in net.modules()} == {'timm', 'torch'}
        with torch.no_grad():
            assert torch.allclose(net(x), m(x, task=task), rtol=1e-5, atol=1e-5)
    if kind == 'staged':
        assert isinstance(net, timm.models.resnet.ResNet) and len(net.layer3) == 1 + 10
    assert timm.data.resolve_model_data_config(net)['input_size'] == m.data_config['input_size']


def test_a_baked_task_runs_where_timm_isomix_cannot_be_imported(tmp_path):
    m = _trained_a_little('isometric')
    net = m.bake('p')
    torch.save(net, tmp_path / 'net.pt')
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / 'x.pt')
    code = ("import sys; sys.modules['timm_isomix'] = None; import torch; "
            f"net = torch.load(r'{tmp_path / 'net.pt'}', weights_only=False); x = torch.load(r'{tmp_path / 'x.pt'}'); "
            f"torch.save(net(x), r'{tmp_path / 'y.pt'}')")
    subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, timeout=120)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / 'y.pt'), m(x, task='p'))


def test_a_task_on_the_resnets_own_schedule_bakes_into_the_timm_resnet_itself():
    resnet, m = task_of_warm_start('resnet50')
    net = m.bake('in1k')
    assert net.state_dict().keys() == resnet.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = resnet(x)
        torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize('kind', list(BACKBONES))
def test_a_baked_task_exports_to_onnx_and_onnxruntime_computes_the_same(kind, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    net = _trained_a_little(kind).bake('p')
    x = torch.randn(2, 3, 32, 32)
    torch.onnx.export(net, (x,), str(tmp_path / 'p.onnx'), input_names=['x'], output_names=['logits'])
    session = ort.InferenceSession(str(tmp_path / 'p.onnx'), providers=['CPUExecutionProvider'])
    out = session.run(None, {'x': x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), net(x), rtol=1e-4, atol=1e-5)


# --- a new task from the command line -------------------------------------------------------------------------
def _image_folder(root, classes, per_class=8, size=12):
    """A tiny ImageFolder whose classes differ by brightness (learnable in a few steps)."""
    from PIL import Image
    for split in ('train', 'val'):
        for i, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for j in range(per_class):
                value = int(255 * i / max(len(classes) - 1, 1))
                Image.new('RGB', (size, size), color=(value, (value + 40 * j) % 256, 128)).save(root / split / c / f'{j}.png')
    return root


def _train_with_tasks(tmp_path, monkeypatch, backbone_spec, tasks, name):
    from helpers import load_script
    import timm_isomix.tasks.train_adapters as train_adapters
    held, load = {}, getattr(train_adapters.load_backbone, '__wrapped__', train_adapters.load_backbone)

    def load_and_hold(spec, kwargs):  # the run's backbone, kept to compare after the run
        held['model'] = load(spec, kwargs)
        held['before'] = {k: v.clone() for k, v in held['model'].state_dict().items()}
        return held['model']
    load_and_hold.__wrapped__ = load
    monkeypatch.setattr(train_adapters, 'load_backbone', load_and_hold)
    import yaml
    task_file = tmp_path / f'{name}.yaml'
    task_file.write_text(yaml.safe_dump({'backbone': backbone_spec, 'tasks': tasks, 'img_size': 32, 'epochs': 2,
                                         'lr': 0.02, 'batch_size': 8, 'output': str(tmp_path / 'out'),
                                         'experiment': name}))
    assert load_script('train').main(['--tasks', str(task_file)]) == 0
    return tmp_path / 'out' / name, held


def test_train_py_tasks_trains_adapters_over_a_frozen_staged_checkpoint_and_isometric_tag(tmp_path, monkeypatch):
    from hubserver import write_train_checkpoint
    from timm_isomix.tasks.train_adapters import load_backbone
    data = _image_folder(tmp_path / 'shades', ['dark', 'mid', 'light'])
    ckpt = str(write_train_checkpoint(tmp_path / 'run', arch='isomix_resnet50', ema=False, heatmap=False, **SMALL))
    for spec, tasks in ((ckpt, [{'name': 'shades', 'data': str(data), 'classes': ['dark', 'mid', 'light'],
                                 'mode': 'mixture_patch'}]),
                        ('isomix_iso_64_8_p4.cifar10', [{'name': 'shades', 'data': str(data), 'classes': 3},
                                                        {'name': 'probe', 'data': str(data), 'classes': 3,
                                                         'mode': 'linear'}])):
        out, held = _train_with_tasks(tmp_path, monkeypatch, spec, tasks, name=f'run{len(tasks)}')
        after = held['model'].state_dict()
        assert all(torch.equal(v, after[k]) for k, v in held['before'].items())  # weights and buffers, bit for bit
        results = json.loads((out / 'results.json').read_text())
        assert list(results['tasks']) == [t['name'] for t in tasks]
        for t in tasks:
            config = json.loads((out / t['name'] / CONFIG_NAME).read_text())
            assert config['results']['mode'] == (t.get('mode') or 'mixture') and config['backbone']['name'] == spec
            assert config['data_config']['input_size'] == [3, 32, 32] and config['data_config']['mean'] == [0.5] * 3
            fresh = MultiTaskIsoMix(load_backbone(spec, {}), {})
            assert fresh.fingerprint() == config['backbone']['fingerprint']
            fresh.load_task(str(out / t['name']))
        assert results['tasks']['shades']['trainable'] < sum(p.numel() for p in held['model'].parameters()) / 5
    from timm_isomix.hub import publish
    assert publish.main([ckpt, '--repo-id', 'acme/staged', '--local-dir', str(tmp_path / 'pub')]) == 0
    assert backbone_fingerprint(load_backbone(f'local-dir:{tmp_path / "pub"}', {})) == \
        backbone_fingerprint(load_backbone(ckpt, {}))  # a local-dir: (or hf-hub:) backbone loads as timm loads it


@pytest.mark.parametrize('content,message', [
    ({'tasks': [{'name': 'a', 'data': 'x', 'classes': 2, 'mode': 'mixture'}]}, 'name a mode.* add "backbone:"'),
    ({'backbone': 'isomix_iso_64_8_p4.cifar10', 'tasks': [{'name': 'a', 'data': 'x', 'classes': 2, 'mode': 'full'}]},
     r"task modes \{'a': 'full'\}: expected one of \('mixture', 'patch', 'mixture_patch', 'linear'\)"),
    ({'backbone': 'isomix_iso_64_8_p4.cifar10', 'share_from': 0, 'tasks': [{'name': 'a', 'data': 'x', 'classes': 2}]},
     r"\['share_from'\] are joint multi-task options"),
    ({'backbone': 'no_such_model_xyz', 'tasks': [{'name': 'a', 'data': 'x', 'classes': 2}]},
     'backbone no_such_model_xyz: Unknown model'),
])
def test_a_task_file_whose_backbone_or_modes_are_wrong_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    import re
    import yaml
    from helpers import load_script
    task_file = tmp_path / 't.yaml'
    task_file.write_text(yaml.safe_dump({**content, 'output': str(tmp_path / 'out')}))
    assert load_script('train').main(['--tasks', str(task_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_the_mixed_task_benchmark_reports_both_backbones_with_ratios_and_the_adapter_load(tmp_path):
    from timm_isomix.tools.bench_tasks import main
    out = tmp_path / 'bench.json'
    report = main(['--batch', '8', '--resnet-size', '32', '--reps', '1', '--steps', '1', '--warmup', '0',
                   '--load-reps', '1', '--out', str(out)])
    assert set(report['results']) == {'study_trunk', 'isomix_resnet50'} and out.is_file()
    for r in report['results'].values():
        assert r['mixed_vs_one_task']['ratio'] > 0 and r['one_task_vs_timm']['timm_ms'] > 0
        assert r['mixed_vs_timm_per_task']['timm_per_task_ms'] > 0
        assert r['adapter']['load_ms'] > 0 and r['adapter']['adapter_bytes'] > 0
    assert report['results']['study_trunk']['grouped_vs_one_task']['grouped_ms'] > 0  # the side-by-side reference
    assert 'grouped_vs_one_task' not in report['results']['isomix_resnet50']  # its mixed batch is the grouped one
    assert report['target_ratio'] == 1.2 and report['command'].endswith('--out ' + str(out))


def test_joint_multi_task_training_runs_over_a_staged_trunk_and_its_model_reloads(tmp_path):
    from timm_isomix.tasks.train_tasks import load_task_model, train_tasks
    data = _image_folder(tmp_path / 'shades', ['dark', 'light'])
    tasks = [{'name': 'a', 'data': str(data), 'classes': 2}, {'name': 'b', 'data': str(data), 'classes': 2}]
    res = train_tasks({'model': 'isomix_resnet50', 'model_kwargs': dict(SMALL), 'img_size': 32, 'epochs': 1,
                       'batch_size': 8, 'patch': True, 'tasks': tasks, 'output': str(tmp_path / 'out'),
                       'experiment': 'staged', 'seed': 0})
    out = tmp_path / 'out' / 'staged'
    assert (out / 'mixtures.png').is_file() and len(res['js_per_layer']) == 24  # 4 + 6 + 10 + 4 executed layers
    model = load_task_model(out / 'model.pth').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x, task=['a', 'b']).shape == (2, 2)
