"""Multi-task isomix: tasks own mixtures, statistics and heads over one shared bank."""
import pytest
import timm
import torch
from PIL import Image

import timm_isomix  # noqa: F401  (registers the models)
from timm_isomix.models.multitask import MultiTaskIsoMix, count_params
from timm_isomix.tasks.data import load_task_data
from timm_isomix.tasks.train_tasks import VARIANTS, build_task_model, load_task_model, read_task_config, train_tasks
from timm_isomix.train.optim import mixture_param_groups
from timm_isomix.train.plots import js_sharing



pytestmark = pytest.mark.usefixtures('one_thread')


TINY = dict(width=8, depth=4, num_templates=2, patch_size=4, zero_init_last=False)  # blocks not identity at init


def tiny_model(tasks=None, **kwargs) -> MultiTaskIsoMix:
    torch.manual_seed(0)
    trunk = timm.create_model('isomix_iso_64_8_p2', num_classes=0, **TINY)
    return MultiTaskIsoMix(trunk, tasks or {'a': 3, 'b': 5}, init_logit=2.0, **kwargs)


def test_tasks_share_one_bank_and_have_their_own_mixture_and_head():
    model = tiny_model()
    x = torch.randn(2, 3, 32, 32)
    assert model(x, task='a').shape == (2, 3) and model(x, task='b').shape == (2, 5)
    names = [n for n, _ in model.named_parameters()]
    assert names.count('bank.weight') == 1
    assert {'tasks.a.schedules.0.mixture.logits', 'tasks.b.schedules.0.mixture.logits'} <= set(names)
    # A task's parameters: L x K logits and its head, nothing of the bank.
    assert count_params(model.task_parameters('a')) == 4 * 2 + 8 * 3 + 3


def test_changing_one_tasks_mixture_leaves_the_other_task_unchanged():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 32, 32)
    a0, b0 = model(x, task='a'), model(x, task='b')
    with torch.no_grad():
        model.tasks['a'].schedules[0].mixture.logits.add_(torch.randn(4, 2))
    assert not torch.allclose(model(x, task='a'), a0)
    assert torch.equal(model(x, task='b'), b0)


def test_each_task_keeps_its_own_batchnorm_statistics():
    model = tiny_model().train()
    b_stats = {k: v.clone() for k, v in model.tasks['b'].state_dict().items() if 'running' in k}
    model(torch.randn(4, 3, 32, 32) * 3 + 1, task='a')
    assert all(torch.equal(v, model.tasks['b'].state_dict()[k]) for k, v in b_stats.items())
    assert not torch.equal(model.tasks['a'].stem_stats.running_mean, model.tasks['b'].stem_stats.running_mean)


def test_share_from_makes_later_layers_use_one_mixture_across_tasks():
    model = tiny_model(share_from=2)
    a, b = model.tasks['a'], model.tasks['b']
    assert a.schedules[1].mixture is b.schedules[1].mixture is model.shared_mixture
    assert a.schedules[0].mixture is not b.schedules[0].mixture
    assert a.alpha().shape == (4, 2)
    assert a.schedules[1].layers[0] is not b.schedules[1].layers[0]  # statistics stay per task
    assert count_params(model.task_parameters('a')) == 2 * 2 + 8 * 3 + 3
    with pytest.raises(ValueError, match='share_from'):
        tiny_model(share_from=5)


def test_a_task_added_to_a_trained_model_leaves_existing_tasks_unchanged():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x, task='a')
    path = model.add_task('c', 7, init_from='a')
    assert torch.equal(model(x, task='a'), before)
    assert model(x, task='c').shape == (2, 7)
    assert torch.equal(path.schedules[0].mixture.logits, model.tasks['a'].schedules[0].mixture.logits)
    assert path.schedules[0].mixture is not model.tasks['a'].schedules[0].mixture


def test_hard_shared_baseline_shares_the_whole_trunk_but_not_heads():
    cfg = {'model': 'isomix_iso_64_8_p2', 'model_kwargs': TINY, 'hard_shared': True,
           'tasks': [{'name': 'a', 'data': 'x', 'classes': 2}, {'name': 'b', 'data': 'x', 'classes': 3}]}
    model = build_task_model(cfg)
    assert model.tasks['a'].schedules[0] is model.tasks['b'].schedules[0]
    assert model.tasks['a'].stem_stats is model.tasks['b'].stem_stats
    assert model.tasks['a'].head is not model.tasks['b'].head


def test_unknown_task_name_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(KeyError, match=r"unknown task 'c'.*\['a', 'b'\]"):
        model(torch.randn(1, 3, 32, 32), task='c')
    with pytest.raises(ValueError, match='new non-empty string'):
        model.add_task('a', 3)


def test_a_task_whose_class_count_disagrees_with_its_shared_head_is_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="4 classes but the head of 'a'.*has 3"):
        model.add_task('c', 4, share_head_with='a')


def _image_folder(root, classes, per_class=6, size=12):
    """A tiny ImageFolder whose classes differ by brightness (learnable in a few steps)."""
    for split in ('train', 'val'):
        for i, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for j in range(per_class):
                value = int(255 * i / max(len(classes) - 1, 1))
                Image.new('L', (size, size), color=value).save(d / f'{j}.png')
    return root


def test_dataset_folder_whose_classes_differ_from_the_tasks_is_rejected(tmp_path):
    root = _image_folder(tmp_path / 'ds', ['cat', 'dog'])
    with pytest.raises(ValueError, match=r"task 'pets' declares 3 classes but .* has 2"):
        load_task_data(root, 'train', 3, task='pets')
    with pytest.raises(ValueError, match=r"declares classes \['cat', 'cow'\]"):
        load_task_data(root, 'train', ['cat', 'cow'], task='pets')
    ds = load_task_data(root, 'train', ['cat', 'dog'], img_size=16, task='pets')
    assert ds.tensors[0].shape == (12, 3, 16, 16)  # grey images become 3-channel and resized


def test_a_task_can_take_some_classes_of_a_folder_labelled_by_their_position(tmp_path):
    root = _image_folder(tmp_path / 'ds', ['a', 'b', 'c'])  # brightness: a dark, c light
    ds = load_task_data(root, 'train', ['c', 'a'], img_size=8, task='two')
    x, y = ds.tensors
    assert len(ds) == 12 and sorted(set(y.tolist())) == [0, 1]
    assert torch.allclose(x[y == 0], torch.ones(1)) and torch.allclose(x[y == 1], -torch.ones(1))
    with pytest.raises(ValueError, match=r"missing: \['d'\]"):
        load_task_data(root, 'train', ['a', 'd'], task='two')


def test_each_variant_builds_the_model_it_names():
    tasks = [{'name': 'a', 'data': 'x', 'classes': 2}, {'name': 'b', 'data': 'x', 'classes': 3}]
    models = {v: build_task_model({'model': 'isomix_iso_64_8_p2', 'model_kwargs': TINY, 'tasks': tasks, **cfg})
              for v, cfg in VARIANTS.items()}
    counts = {v: m.param_counts() for v, m in models.items()}
    a, b = (models['isomix'].tasks[t] for t in 'ab')
    assert a.schedules[0].mixture is not b.schedules[0].mixture and a.stem_stats is not b.stem_stats
    st = models['shared_trunk']
    assert st.tasks['a'].schedules[0].mixture is st.tasks['b'].schedules[0].mixture
    assert st.tasks['a'].stem_stats is not st.tasks['b'].stem_stats
    assert models['model_patch'].tasks['b'].has_patch and not models['shared_trunk'].tasks['b'].has_patch
    assert models['hard_shared'].tasks['a'].stem_stats is models['hard_shared'].tasks['b'].stem_stats
    assert models['independent'].tasks['b'].bank is not None
    # the same trunk everywhere: isomix adds one mixture per task, independent a whole trunk
    assert counts['isomix']['total'] - counts['shared_trunk']['total'] == 4 * 2
    assert counts['independent']['total'] == counts['independent']['used']['a'] + counts['independent']['used']['b']
    assert counts['independent']['shared'] == 0
    bank = models['model_patch'].bank  # patched tasks run their own scale and shift, not the bank's or stem's
    assert counts['model_patch']['shared'] == counts['shared_trunk']['shared'] - bank.affine.numel() - 2 * 8


def test_task_file_without_required_fields_is_rejected(tmp_path):
    f = tmp_path / 't.yaml'
    f.write_text('tasks:\n  - {name: a, data: mnist}\n')
    with pytest.raises(ValueError, match=r"lacks \['classes'\]"):
        read_task_config(f)
    with pytest.raises(FileNotFoundError):
        read_task_config(tmp_path / 'missing.yaml')


def test_js_sharing_is_zero_for_equal_mixtures_and_one_for_disjoint_ones():
    eye = torch.eye(2)
    assert torch.allclose(js_sharing({'a': eye, 'b': eye}), torch.zeros(2))
    assert torch.allclose(js_sharing({'a': eye, 'b': eye.flip(0)}), torch.ones(2))


def test_train_tasks_learns_jointly_and_writes_task_checkpoints_and_plots(tmp_path):
    _image_folder(tmp_path / 'dark', ['0', '1'], per_class=16)
    _image_folder(tmp_path / 'light', ['x', 'y', 'z'], per_class=16)
    cfg = {'model': 'isomix_iso_64_8_p2', 'model_kwargs': TINY, 'img_size': 16, 'epochs': 8, 'lr': 0.01,
           'batch_size': 8, 'tasks': [{'name': 'dark', 'data': str(tmp_path / 'dark'), 'classes': 2},
                                      {'name': 'light', 'data': str(tmp_path / 'light'), 'classes': ['x', 'y', 'z']}]}
    cfg.update(output=str(tmp_path / 'out'), experiment='run', seed=0)
    res = train_tasks(cfg)
    out = tmp_path / 'out' / 'run'
    for f in ('model.pth', 'task_dark.pth', 'task_light.pth', 'mixtures.png', 'sharing.png', 'summary.csv',
              'results.json'):
        assert (out / f).is_file(), f
    assert res['top1']['dark'] > 50 and res['top1']['light'] > 34  # above chance on held-out images
    assert len(res['js_per_layer']) == 4
    task_ckpt = torch.load(out / 'task_light.pth', weights_only=True)
    assert task_ckpt['num_classes'] == 3 and 'schedules.0.mixture.logits' in task_ckpt['state_dict']
    model = load_task_model(out / 'model.pth').eval()
    x = torch.randn(2, 3, 16, 16)
    assert model(x, task='light').shape == (2, 3)
    # A second run never overwrites the first.
    cfg['epochs'] = 1
    res2 = train_tasks(cfg)
    assert res2['out_dir'] != str(out) and (out / 'model.pth').is_file()


def test_joint_training_on_real_digits_beats_chance(shared_dataset, tmp_path):
    cfg = {'model': 'isomix_iso_64_8_p2', 'model_kwargs': dict(width=16, depth=4, num_templates=2, patch_size=4),
           'epochs': 5, 'lr': 0.01, 'batch_size': 16, 'train_limit': 500, 'val_limit': 200,
           'tasks': [{'name': 'mnist', 'data': str(shared_dataset('mnist')), 'classes': 10},
                     {'name': 'usps', 'data': str(shared_dataset('usps')), 'classes': 10}]}
    res = train_tasks({**cfg, 'output': str(tmp_path), 'experiment': 'digits', 'seed': 0})
    assert res['top1']['mnist'] > 40 and res['top1']['usps'] > 40  # chance: 10


# --- the controls: shared trunk, model patch, independent networks, parameter counts -------------
def test_share_from_zero_is_a_hard_shared_trunk_with_per_task_statistics():
    model = tiny_model(share_from=0).train()
    a, b = model.tasks['a'], model.tasks['b']
    assert [s.mixture for s in a.schedules] == [model.shared_mixture] == [s.mixture for s in b.schedules]
    assert a.mixture_logits(model.shared_mixture) == []
    model(torch.randn(4, 3, 32, 32) * 3 + 1, task='a')
    assert not torch.equal(a.schedules[0].layers[0].bn1.running_mean, b.schedules[0].layers[0].bn1.running_mean)
    assert count_params(model.task_parameters('a')) == 8 * 3 + 3  # the head alone


def test_a_patched_task_starts_as_it_was_and_owns_its_batchnorm_scale_and_shift():
    model = tiny_model(share_from=0).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x, task='a')
    path = model.add_task('p', 3, init_from='a', patch=True)
    with torch.no_grad():
        path.head.load_state_dict(model.tasks['a'].head.state_dict())
    assert torch.allclose(model(x, task='p'), before, atol=1e-5)  # the patch starts at the mixed scale/shift
    affine = model.bank.affine.shape[1]
    assert path.patch_stem.shape == (2, 8) and path.patch_layers.shape == (4, affine)
    assert count_params(model.task_parameters('p')) == 2 * 8 + 4 * affine + 8 * 3 + 3
    with torch.no_grad():
        path.patch_layers.mul_(2)
        model.bank.affine.mul_(3)  # the bank's scale and shift no longer reach a patched task
    out = model(x, task='p')
    with torch.no_grad():
        model.bank.affine.zero_()
    assert torch.equal(model(x, task='p'), out) and not torch.allclose(out, before, atol=1e-3)


def test_patches_get_a_group_of_their_own_only_when_a_patch_lr_multiplier_is_given():
    model = tiny_model(share_from=0)
    model.add_task('p', 3, init_from='a', patch=True)
    patches = {id(model.tasks['p'].patch_stem), id(model.tasks['p'].patch_layers)}
    groups = mixture_param_groups(model, 0.05, 1e-3, 10.)
    assert 'patch' not in {g.get('group_name') for g in groups}
    groups = {g.get('group_name'): g for g in mixture_param_groups(model, 0.05, 1e-3, 10., patch_lr_mult=4.)}
    assert {id(p) for p in groups['patch']['params']} == patches
    assert groups['patch']['lr'] == pytest.approx(4e-3) and groups['patch']['weight_decay'] == 0.
    others = [id(p) for name, g in groups.items() if name != 'patch' for p in g['params']]
    assert not patches & set(others) and len(others) == len(set(others))


def test_independent_tasks_run_their_own_stem_and_bank_and_are_counted_in_full():
    model = tiny_model({'a': 3})
    model.add_task('b', 5, own_trunk=True)
    x = torch.randn(2, 3, 32, 32)
    b0 = model.eval()(x, task='b')
    with torch.no_grad():
        model.bank.weight.add_(1.)  # task a's trunk
    assert torch.equal(model(x, task='b'), b0)
    counts = model.param_counts()
    assert counts['shared'] == 0
    assert counts['own']['a'] == counts['used']['a'] == count_params(model.used_parameters('a'))
    assert counts['total'] == counts['used']['a'] + counts['used']['b'] == count_params(model)


def test_parameter_counts_count_the_shared_bank_and_stem_once():
    model = tiny_model({'a': 3, 'b': 5, 'c': 2})
    counts = model.param_counts()
    trunk = count_params(model.bank) + count_params(model.stem)
    assert counts['shared'] == trunk
    assert counts['own'] == {'a': 4 * 2 + 8 * 3 + 3, 'b': 4 * 2 + 8 * 5 + 5, 'c': 4 * 2 + 8 * 2 + 2}
    assert counts['total'] == trunk + sum(counts['own'].values()) == count_params(model)
    assert counts['used']['a'] == trunk + counts['own']['a']


def test_random_mixture_init_gives_every_task_its_own_start():
    model = tiny_model(mixture_init='random', share_from=2)
    la, lb = (model.tasks[t].schedules[0].mixture.logits for t in 'ab')
    assert not torch.equal(la, lb) and la.min() >= 0 and la.max() <= 1
    with pytest.raises(ValueError, match="unknown mixture_init 'glorot'"):
        tiny_model(mixture_init='glorot')


def test_a_patch_cannot_be_combined_with_a_borrowed_trunk():
    model = tiny_model()
    with pytest.raises(ValueError, match='share_trunk_with takes the whole trunk'):
        model.add_task('c', 3, share_trunk_with='a', patch=True)


def test_study_task_data_is_cached_as_uint8_and_reads_back_exactly(tmp_path, monkeypatch):
    from experiments.task_runs import task_data
    monkeypatch.setenv('ISOMIX_STATE', str(tmp_path / 'state'))
    root = tmp_path / 'ds'
    for i, c in enumerate(['a', 'b']):
        (root / 'train' / c).mkdir(parents=True)
        for j in range(3):
            Image.new('RGB', (8, 8), color=(37 * i + j, 200 - j, 5)).save(root / 'train' / c / f'{j}.png')
    spec = {'name': 't', 'data': str(root), 'classes': ['b', 'a']}
    first = task_data(spec, 'train', 8, None)
    assert len(list((tmp_path / 'state' / 'cache').glob('*.pt'))) == 1
    again = task_data(spec, 'train', 8, None)  # from the cache
    direct = load_task_data(root, 'train', ['b', 'a'], 8)
    assert torch.equal(first.tensors[1], direct.tensors[1]) and torch.equal(again.tensors[0], first.tensors[0])
    assert torch.allclose(again.tensors[0], direct.tensors[0], atol=1e-6)


def test_sharing_summary_counts_seeds_whose_late_layers_diverge_more():
    from experiments.task_report import sharing_summary
    s = sharing_summary([[0.0, 0.1, 0.5, 0.6], [0.2, 0.2, 0.1, 0.1], [0.0, 0.0, 0.3, 0.3]])
    assert s['late_above_early'] == 2 and s['n'] == 3
    assert s['early'] == pytest.approx([0.05, 0.2, 0.0]) and s['mean'][2] == pytest.approx(0.3)
