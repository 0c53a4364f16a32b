"""The LoRA baselines of the adapters-vs-LoRA study (experiments/lora.py, experiments/studies/adapters_vs_lora.py):
peft's LoRA on a plain timm network counted, placed and started as stated, the plain transfers training only what
they say, and the study choosing its lr on the held-out split."""
import json

import pytest
import timm
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset
from timm.models.resnet import BasicBlock, ResNet

pytest.importorskip('peft')

from experiments import lora  # noqa: E402
from experiments.runner import Scale  # noqa: E402
from experiments.studies import adapters_vs_lora as study  # noqa: E402


def _tiny_resnet(num_classes: int = 5) -> ResNet:
    torch.manual_seed(0)
    return ResNet(BasicBlock, layers=[1, 1, 1, 1], channels=(8, 8, 16, 16), num_classes=num_classes)


def _data(n: int = 40, classes: int = 5) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, classes, (n,), generator=g))


def test_lora_count_is_what_peft_adds_and_targets_are_exact_module_names():
    net = _tiny_resnet()
    targets = ['conv1', 'layer4.0.conv2']  # 'conv1' is the stem's alone, not every block's conv1
    modules = dict(net.named_modules())
    expected = sum(lora.lora_count(modules[t], 2) for t in targets) + net.fc.weight.numel() + net.fc.bias.numel()
    adapted = lora.add_lora(net, targets, rank=2, head='fc')
    assert lora.trainable_count(adapted) == expected
    adapted_layers = {n.split('.lora_A')[0].replace('base_model.model.', '') for n, _ in adapted.named_parameters()
                      if '.lora_A.' in n}
    assert adapted_layers == set(targets)


def test_choose_targets_takes_the_layers_from_one_end_closest_to_the_budget():
    net = _tiny_resnet()
    modules = dict(net.named_modules())
    names = lora.conv_layers(net)
    counts = [lora.lora_count(modules[n], 1) for n in names]
    budget = sum(counts[-3:]) + 1
    assert lora.choose_targets(net, budget, 1, 'head') == names[-3:]
    assert lora.choose_targets(net, sum(counts[:2]), 1, 'stem') == names[:2]
    assert lora.choose_targets(net, 0, 1, 'head') == names[-1:]  # at least one layer
    with pytest.raises(ValueError, match='end must be one of'):
        lora.choose_targets(net, budget, 1, 'middle')


def test_an_adapted_network_starts_as_the_network_it_adapts():
    net = _tiny_resnet().eval()
    x = torch.randn(4, 3, 16, 16)
    before = net(x)
    adapted = lora.add_lora(net, lora.conv_layers(net), rank=3, head='fc').eval()
    assert torch.allclose(adapted(x), before, atol=1e-6)


def test_reestimated_statistics_are_the_average_over_the_batches():
    bn = nn.BatchNorm2d(3)
    data = _data(32)
    lora.reestimate_bn(nn.Sequential(bn), data, batch_size=8)
    xs = data.tensors[0]
    means = torch.stack([xs[i:i + 8].mean((0, 2, 3)) for i in range(0, 32, 8)])
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-6)
    assert bn.momentum == 0.1  # restored


@pytest.mark.parametrize('mode', ['lora', 'linear'])
def test_a_plain_transfer_trains_only_what_its_mode_says(mode, one_thread):
    net = _tiny_resnet()
    if mode == 'lora':
        net = lora.add_lora(net, ['layer4.0.conv2'], rank=1, head='fc')
    frozen = {k: v.clone() for k, v in net.state_dict().items() if 'fc' not in k and 'lora' not in k
              and 'running' not in k and 'num_batches' not in k}
    res = lora.transfer_plain(net, _data(), _data(16), mode, 'fc', epochs=1, batch_size=8, lr=1e-2, device='cpu')
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert res['trainable'] == lora.trainable_count(net) > 0 and 0. <= res['top1'] <= 100.
    with pytest.raises(ValueError, match='unknown plain mode'):
        lora.transfer_plain(net, _data(), _data(), 'everything', 'fc')


def test_safetensors_bytes_are_the_size_of_the_file(tmp_path):
    from safetensors.torch import save_file
    tensors = {'a': torch.zeros(110), 'b.weight': torch.ones(3, 4)}
    save_file(tensors, str(tmp_path / 'x.safetensors'))
    assert lora.safetensors_bytes(tensors) == (tmp_path / 'x.safetensors').stat().st_size >= 4 * 122


def test_the_study_has_every_method_per_task_and_a_grid_for_each():
    from experiments.runner import STUDIES
    compare, select = STUDIES[study.COMPARE].configs, STUDIES[study.SELECT].configs
    assert set(compare) == {f'{t}.{m}' for t in study.TASKS for m in study.METHODS}
    for task in study.TASKS:
        for method in study.METHODS:
            tried = [c for c in select.values() if c['task'] == task and c['method'] == method]
            assert len(tried) == len(study.GRIDS[method]) * (2 if method == 'lora_matched' else 1)
            assert all(c['select'] for c in tried)


def test_the_held_out_split_is_apart_from_the_training_images(shared_dataset, tmp_path, monkeypatch):
    shared_dataset('mnistm')
    monkeypatch.setenv('ISOMIX_STATE', str(tmp_path))
    train, held, val = study.splits('mnistm', Scale(train_limit=200, val_limit=50))
    assert len(train) == len(held) == 200 and len(val) == 50
    flat = lambda ds: {tuple(x.flatten()[:64].tolist()) for x in ds.tensors[0]}  # noqa: E731
    assert not flat(train) & flat(held)
    again, _, _ = study.splits('mnistm', Scale(train_limit=200, val_limit=50))
    assert torch.equal(again.tensors[0], train.tensors[0])


def test_the_comparison_takes_the_best_held_out_choice(tmp_path, monkeypatch):
    monkeypatch.setenv('ISOMIX_RESULTS', str(tmp_path))
    with pytest.raises(FileNotFoundError, match='run `python -m experiments run adapters-vs-lora-select'):
        study.chosen('mnistm', 'lora_matched')
    from experiments.runner import STUDIES
    for name, config in STUDIES[study.SELECT].configs.items():
        if config['task'] == 'mnistm' and config['method'] == 'lora_matched':
            top1 = 50. + (config['lr'] == 1e-2) * 10. + (config['end'] == 'stem') * 5.
            path = tmp_path / study.SELECT / 'cpu' / name / 'seed0.json'
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({'config_name': name, 'seed': 0, 'result': {'top1': top1}}))
    assert study.chosen('mnistm', 'lora_matched') == {'lr': 1e-2, 'end': 'stem', 'heldout_top1': 65.}


def test_matched_lora_over_a_baked_task_has_about_the_adapters_trainable_count(one_thread):
    from timm_isomix.models.multitask import MultiTaskIsoMix
    from timm_isomix.tasks.transfer import freeze_for_transfer
    torch.manual_seed(0)
    trunk = timm.create_model('isomix_iso_64_8_p2', width=16, depth=4, num_templates=2, patch_size=4, num_classes=0)
    model = MultiTaskIsoMix(trunk, {'source': 10})
    budget = study.adapter_budget(model, 'source', 10)
    assert list(model.tasks) == ['source']  # counted on a copy
    model.add_task('b', 10, init_from='source', patch=True)
    assert budget == sum(p.numel() for p in freeze_for_transfer(model, 'b', 'mixture_patch'))
    net = model.bake('source')
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(net(x), model.eval()(x, task='source'), atol=1e-5)
    head = study.head_name(net)
    head_count = sum(p.numel() for p in net.get_submodule(head).parameters())
    targets = lora.choose_targets(net, budget - head_count, 1, 'head')
    adapted = lora.add_lora(net, targets, 1, head)
    one_layer = max(lora.lora_count(net.get_submodule(t), 1) for t in lora.conv_layers(net))
    assert abs(lora.trainable_count(adapted) - budget) <= one_layer / 2
