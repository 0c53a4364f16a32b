"""The method: banks, mixtures, schedules; fixed parameter count; orders; warm start and pretrained weights;
initialisation; bad input."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
import timm
from safetensors.torch import save_file

import timm_isomix  # noqa: F401
from timm_isomix import BasicLayer, Mixture, Schedule, TemplateBank, resnet_to_isomix
from timm_isomix.models.warm_start import FINE_TUNE_RECIPE

from helpers import ROOT, hub_cache_entry

RESNET_TEMPLATES = {'resnet18': (1, 1, 1, 1), 'resnet26': (1, 1, 1, 1), 'resnet50': (2, 3, 5, 2), 'resnet101': (2, 3, 22, 2)}


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so a wrong mapping of them shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.affine:
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.normal_(1.0, 0.2, generator=g)
                m.bias.normal_(0, 0.1, generator=g)


def _identity_order(name: str):
    return [list(range(k)) for k in RESNET_TEMPLATES[name]]


# --- the mixture ---------------------------------------------------------------------------------

def test_mixed_parameters_are_the_alpha_weighted_sum_of_templates():
    bank = TemplateBank(BasicLayer.template_shapes(8), num_templates=3)
    torch.nn.init.normal_(bank.weight)
    torch.nn.init.normal_(bank.affine)
    mixture = Mixture(num_layers=4, num_templates=3)
    torch.nn.init.normal_(mixture.logits)
    weight, affine = mixture(bank.weight, bank.affine)
    alpha = torch.softmax(mixture.logits, -1)
    for l in range(4):
        params = bank.unflatten(weight[l], affine[l])
        for name in params:
            expected = sum(alpha[l, k] * bank.template(k)[name] for k in range(3))
            torch.testing.assert_close(params[name], expected)


def test_the_mixed_parameters_use_the_logits_divided_by_the_temperature():
    bank = TemplateBank(BasicLayer.template_shapes(4), num_templates=3)
    torch.nn.init.normal_(bank.weight)
    torch.nn.init.normal_(bank.affine)
    logits = torch.randn(2, 3)
    mixed = {}
    for temperature in (1.0, 4.0):
        mixture = Mixture(num_layers=2, num_templates=3, temperature=temperature)
        with torch.no_grad():
            mixture.logits.copy_(logits)
        alpha = torch.softmax(logits / temperature, -1)
        torch.testing.assert_close(mixture.alpha(), alpha)
        for training in (True, False):  # the training path, and eval's cached mixing
            mixture.train(training)
            with torch.set_grad_enabled(training):
                weight, affine = mixture(bank.weight, bank.affine)
            torch.testing.assert_close(weight, alpha @ bank.weight.detach())
            torch.testing.assert_close(affine, alpha @ bank.affine.detach())
        mixed[temperature] = weight
    assert not torch.allclose(mixed[1.0], mixed[4.0])


def test_initial_schedule_is_the_cyclic_order_as_learnable_logits():
    model = timm.create_model('isomix_resnet50', reuse=2)
    for mixture, k in zip(model.mixtures().values(), RESNET_TEMPLATES['resnet50']):
        assert mixture.logits.requires_grad
        assert mixture.argmax_order() == [l % k for l in range(2 * k)]


def test_mixture_logits_receive_gradients_in_training():
    model = timm.create_model('isomix_iso_64_8_p2', temperature=8.0, zero_init_last=False).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    assert model.schedule.mixture.logits.grad.abs().sum() > 0
    assert model.bank.weight.grad.abs().sum() > 0


# --- fixed parameter count, free depth and order ---------------------------------------------------

@pytest.mark.parametrize('name', list(RESNET_TEMPLATES))
def test_parameter_count_is_the_resnets_plus_the_logits(name):
    resnet = _num_params(timm.create_model(name))
    for reuse in (1, 2, 3):
        model = timm.create_model(f'isomix_{name}', reuse=reuse)
        logits = sum(reuse * k * k for k in RESNET_TEMPLATES[name])
        assert _num_params(model) == resnet + logits


def test_changing_depth_and_order_leaves_the_templates_untouched():
    model = timm.create_model('isomix_resnet50', reuse=1)
    banks = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if '.bank.' in n}
    base = _num_params(model) - sum(m.logits.numel() for m in model.mixtures().values())
    model.set_schedule(reuse=3)
    assert [m.num_layers for m in model.mixtures().values()] == [6, 9, 15, 6]
    model.set_schedule(order=[[1, 0, 1, 0, 1], None, [4, 4, 0], None])
    assert [m.num_layers for m in model.mixtures().values()] == [5, 9, 3, 6]
    after = dict(model.named_parameters())
    for n, (p, value) in banks.items():
        assert after[n] is p and torch.equal(p, value), f'{n} changed'
    logits = sum(m.logits.numel() for m in model.mixtures().values() if m.logits is not None)
    assert _num_params(model) == base + logits
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_reuse_and_order_model_kwargs_build_the_schedule():
    model = timm.create_model('isomix_resnet50', reuse=[1, 2, 1, 3], order={1: [2, 2, 2, 0]})
    assert [m.num_layers for m in model.mixtures().values()] == [2, 4, 5, 6]
    assert model.mixtures()['stages.1'].order == (2, 2, 2, 0)
    rebuilt = timm.create_model('isomix_resnet50', **model.schedule_args())
    assert [m.num_layers for m in rebuilt.mixtures().values()] == [2, 4, 5, 6]
    iso = timm.create_model('isomix_iso_64_8_p2', order=[3, 3, 1])
    assert iso.schedule.mixture.order == (3, 3, 1) and iso.schedule_args() == dict(order=[3, 3, 1])


def test_a_hard_order_executes_exactly_the_named_templates():
    torch.manual_seed(0)
    order = [2, 0, 2, 2]
    model = timm.create_model('isomix_iso_64_8_p2', order=order, zero_init_last=False).eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.stem(x)
        for layer, k in zip(model.schedule.layers, order):
            expected = layer(expected, model.bank.template(k))  # the template as it is
        torch.testing.assert_close(model.forward_features(x), expected, rtol=0, atol=0)
        before = model(x)
        model.bank.template(1)['conv1.weight'].add_(1.0)  # a template the order does not name
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        model.bank.template(0)['conv1.weight'].add_(1.0)  # a template it names
        assert not torch.allclose(model(x), before)


def test_a_hard_order_has_no_logits_and_never_mixes():
    mixture = Mixture(num_layers=3, num_templates=4, order=[3, 1, 3])
    weight, affine = torch.randn(4, 10), torch.randn(4, 2)
    out_w, out_a = mixture(weight, affine)
    assert out_w is weight and out_a is affine  # the bank itself; layer l reads row order[l]
    assert mixture.rows() == (3, 1, 3) and mixture.logits is None
    assert torch.equal(mixture.alpha(), F.one_hot(torch.tensor([3, 1, 3]), 4).float())


def test_several_schedules_run_over_one_bank_without_copying_it():
    bank = TemplateBank(BasicLayer.template_shapes(8), num_templates=2)
    for k in range(2):
        BasicLayer.init_template(bank.template(k), zero_init_last=False)
    a = Schedule(lambda **kw: BasicLayer(8, **kw), Mixture(3, 2))
    b = Schedule(lambda **kw: BasicLayer(8, **kw), Mixture(5, 2, order=[1, 1, 0, 1, 0]))
    x = torch.randn(2, 8, 6, 6)
    (a(x, bank).sum() + b(x, bank).sum()).backward()
    assert bank.weight.grad is not None and a.mixture.logits.grad is not None
    assert not any(p is bank.weight for p in a.parameters()) and not any(p is bank.weight for p in b.parameters())
    assert a.layers[0].bn1.running_mean is not b.layers[0].bn1.running_mean  # statistics are per schedule


def test_logits_get_no_weight_decay():
    from timm.optim import create_optimizer_v2
    model = timm.create_model('isomix_resnet18')
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    for name, p in model.named_parameters():
        if name.endswith('mixture.logits') or name.endswith('bank.affine'):
            assert id(p) in no_decay, name
        if name.endswith('bank.weight'):
            assert id(p) not in no_decay, name


# --- eval-mode caching -------------------------------------------------------------------------------

def test_eval_mixes_once_and_recomputes_after_a_parameter_update():
    model = timm.create_model('isomix_iso_64_8_p2', temperature=4.0, zero_init_last=False).eval()
    x = torch.randn(2, 3, 32, 32)
    mixture = model.schedule.mixture
    with torch.no_grad():
        y0 = model(x)
        cached = mixture._cache[1][0]
        model(x)
        assert mixture._cache[1][0] is cached  # reused, not recomputed
        mixture.logits[:, 0] += 3.0  # in-place change, as an optimizer step does
        y1 = model(x)
    assert mixture._cache[1][0] is not cached
    fresh = copy.deepcopy(model)
    fresh.schedule.mixture._cache = None
    with torch.no_grad():
        torch.testing.assert_close(y1, fresh(x))
    assert not torch.allclose(y0, y1)
    model.train()
    assert mixture._cache is None


def test_eval_with_autograd_does_not_cache_so_gradients_flow():
    model = timm.create_model('isomix_iso_64_8_p2', temperature=4.0).eval()
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert model.schedule.mixture.logits.grad is not None
    assert model.schedule.mixture._cache is None


# --- warm start from timm's ResNets ------------------------------------------------------------------

@pytest.mark.parametrize('name', list(RESNET_TEMPLATES))
def test_warm_start_reproduces_the_resnet(name):
    torch.manual_seed(0)
    resnet = timm.create_model(name).eval()
    _randomize_bn(resnet)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = resnet(x)
        for kwargs in (dict(reuse=1, order=_identity_order(name)), dict(reuse=1)):
            model = timm.create_model(f'isomix_{name}', **kwargs).eval()
            model.load_state_dict(resnet_to_isomix(resnet.state_dict(), model))
            diff = (model(x) - expected).abs().max().item()
            # hard identity order: the templates run as they are, the very operations of the ResNet (exact);
            # soft logits: off-weights ~1e-7 each, compounding over depth (random BN statistics make these
            # outputs large, up to ~1e4)
            tol = 0. if 'order' in kwargs else 1e-4 * expected.abs().max().item()
            assert diff <= tol, f'{kwargs}: max abs difference {diff}'


def test_warm_start_with_reuse_2_gives_a_deeper_network_with_the_sources_statistics():
    resnet = timm.create_model('resnet50').eval()
    _randomize_bn(resnet)
    model = timm.create_model('isomix_resnet50', reuse=2)
    model.load_state_dict(resnet_to_isomix(resnet.state_dict(), model))
    stage = model.stages[2]
    assert stage.schedule.num_layers == 10
    for l, layer in enumerate(stage.schedule.layers):  # layer l runs template l % 5, i.e. block l % 5 + 1
        torch.testing.assert_close(layer.bn2.running_var, resnet.layer3[l % 5 + 1].bn2.running_var)
    assert torch.isfinite(model.eval()(torch.randn(1, 3, 64, 64))).all()


def _resnet_on_the_hub(name, tmp_path, monkeypatch):
    """timm's `name` with random weights and BN statistics, stored offline as the Hub weights of the default tag
    of isomix_`name` (timm's own ResNet tag), so `create_model(..., pretrained=True)` needs no other argument."""
    import huggingface_hub.constants as hf_constants
    torch.manual_seed(0)
    resnet = timm.create_model(name).eval()
    _randomize_bn(resnet)
    repo_id = timm.models.get_pretrained_cfg(f'isomix_{name}').hf_hub_id
    save_file(resnet.state_dict(), str(hub_cache_entry(tmp_path / 'hub', repo_id) / 'model.safetensors'))
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    return resnet


@pytest.mark.parametrize('name', list(RESNET_TEMPLATES))
def test_pretrained_without_other_arguments_is_the_source_resnet_exactly(name, tmp_path, monkeypatch, caplog):
    resnet = _resnet_on_the_hub(name, tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING):
        model = timm.create_model(f'isomix_{name}', pretrained=True).eval()
    assert not caplog.records  # the ResNet itself: nothing to warn about
    # one executed layer per template, in the hard identity order: the templates run as they are
    assert [list(m.order) for m in model.mixtures().values()] == _identity_order(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), resnet(x))


def test_a_deeper_schedule_over_pretrained_weights_warns_that_it_is_a_starting_point_for_fine_tuning(
        tmp_path, monkeypatch, caplog):
    resnet = _resnet_on_the_hub('resnet50', tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING):
        deeper = timm.create_model('isomix_resnet50', pretrained=True, reuse=2)
    record, = caplog.records
    assert record.levelno == logging.WARNING and record.name.startswith('timm_isomix.')
    assert 'starting point for fine-tuning' in record.getMessage() and FINE_TUNE_RECIPE in record.getMessage()
    assert (ROOT / FINE_TUNE_RECIPE).is_file()
    assert [m.num_layers for m in deeper.mixtures().values()] == [4, 6, 10, 4]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # reuse=1 asks for the ResNet's depth: sharp learnable logits
        model = timm.create_model('isomix_resnet50', pretrained=True, reuse=1).eval()
    assert not caplog.records and all(m.logits is not None for m in model.mixtures().values())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), resnet(x), rtol=1e-4, atol=1e-4 * resnet(x).abs().max().item())


# --- changing the schedule of a trained or warm-started model -----------------------------------------

def _layer_stats(stage):
    return [{k: v.clone() for k, v in layer.state_dict().items()} for layer in stage.schedule.layers]


def test_set_schedule_keeps_each_layers_logits_and_statistics_where_its_template_stays(tmp_path, monkeypatch):
    """A warm start made deeper: layers 0..K-1 run the same templates at the same places and keep everything;
    layer l >= K starts as the first layer that ran its template (l mod K): its statistics and logits. So the
    deeper network is the one a deeper warm start builds, and its mixtures stay one-hot."""
    _resnet_on_the_hub('resnet50', tmp_path, monkeypatch)
    model = timm.create_model('isomix_resnet50', pretrained=True, reuse=1).eval()
    before = {name: (m.logits.detach().clone(), _layer_stats(s))
              for (name, m), s in zip(model.mixtures().items(), model.stages)}
    model.set_schedule(reuse=2)
    for (name, mixture), stage in zip(model.mixtures().items(), model.stages):
        logits, stats = before[name]
        k = mixture.num_templates
        assert mixture.num_layers == 2 * k
        for l, layer in enumerate(stage.schedule.layers):
            source = l % k  # l itself for l < K
            assert torch.equal(mixture.logits[l], logits[source]), (name, l)
            assert all(torch.equal(v, stats[source][key]) for key, v in layer.state_dict().items()), (name, l)
        assert mixture.alpha().max(-1).values.min() > 1 - 1e-6  # the largest alpha stays ~1
    deeper = timm.create_model('isomix_resnet50', pretrained=True, reuse=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), deeper(x))


def test_set_schedule_from_the_pretrained_hard_order_gives_sharp_learnable_logits(tmp_path, monkeypatch):
    resnet = _resnet_on_the_hub('resnet50', tmp_path, monkeypatch)  # banks of 2 to 5 templates
    model = timm.create_model('isomix_resnet50', pretrained=True).eval()  # hard identity order, no logits
    model.set_schedule(reuse=1)
    assert all(m.logits is not None and m.alpha().max(-1).values.min() > 1 - 1e-6 for m in model.mixtures().values())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), resnet(x), rtol=1e-4, atol=1e-4 * resnet(x).abs().max().item())


def test_a_deeper_schedule_keeps_the_statistics_of_each_pass():
    """reuse 2 -> 3: the second pass over the templates keeps its own statistics (not the first pass's);
    the new third pass starts from the first pass's."""
    model = timm.create_model('isomix_iso_64_8_p2', reuse=2, mixture_init='cyclic')  # 8 layers over 4 templates
    with torch.no_grad():
        for l, layer in enumerate(model.schedule.layers):
            layer.bn1.running_mean.fill_(l)
    model.set_schedule(reuse=3)
    assert [layer.bn1.running_mean[0].item() for layer in model.schedule.layers] == [
        0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]


# --- initialisation ----------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['isomix_resnet18', 'isomix_iso_64_8_p2'])
def test_init_weights_sets_every_parameter_and_buffer_including_the_mixture_logits(name):
    model = timm.create_model(name, device='meta', mixture_init='cyclic').to_empty(device='cpu')
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.fill_(float('nan'))
    model.init_weights()
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if not torch.isfinite(t).all()]
    assert not bad
    fresh = timm.create_model(name, mixture_init='cyclic')
    for (n, mixture), expected in zip(model.mixtures().items(), fresh.mixtures().values()):
        assert torch.equal(mixture.logits, expected.logits), n  # the initial (cyclic) logits


def test_every_model_cites_the_paper_in_its_pretrained_cfg():
    for name in timm.list_models('isomix_*', include_tags=True):
        assert timm.models.get_pretrained_cfg(name).paper_ids == 'arXiv:2107.10963', name
    assert timm.create_model('isomix_resnet18').pretrained_cfg['paper_ids'] == 'arXiv:2107.10963'


# --- bad input -------------------------------------------------------------------------------------

def test_an_order_index_outside_the_bank_is_an_error():
    with pytest.raises(ValueError, match=r'templates \[7\] outside the bank \(valid: 0\.\.3\)'):
        timm.create_model('isomix_iso_64_8_p2', order=[0, 7, 1])
    with pytest.raises(ValueError, match='outside the bank'):
        timm.create_model('isomix_resnet50').set_schedule(order={2: [0, 5]})


def test_an_order_for_a_stage_that_does_not_exist_is_an_error():
    with pytest.raises(ValueError, match=r'stages \[4\].*banked stages 0\.\.3'):
        timm.create_model('isomix_resnet50', order={4: [0, 1]})
    with pytest.raises(ValueError, match='5 entries but this model has 4 banked stages'):
        timm.create_model('isomix_resnet50', order=[[0], [0], [0], [0], [0]])


def test_fewer_than_one_template_or_layer_is_an_error():
    with pytest.raises(ValueError, match='at least one template'):
        timm.create_model('isomix_iso_64_8_p2', num_templates=0)
    with pytest.raises(ValueError, match='at least one layer'):
        timm.create_model('isomix_iso_64_8_p2', depth=0)
    with pytest.raises(ValueError, match='reuse must be'):
        timm.create_model('isomix_resnet18', reuse=0)
    with pytest.raises(ValueError, match='at least 2 blocks'):
        timm.create_model('isomix_resnet18', layers=(2, 1, 2, 2))


def test_an_incompatible_state_dict_lists_missing_and_unexpected_keys():
    model = timm.create_model('isomix_resnet50')
    with pytest.raises(ValueError, match=r'missing keys: \[layer1\.0\.bn3.*unexpected keys: \[\]'):
        resnet_to_isomix(timm.create_model('resnet18').state_dict(), model)
    with pytest.raises(ValueError, match=r'unexpected keys: \[layer1\.0\.bn3'):
        resnet_to_isomix(timm.create_model('resnet50').state_dict(), timm.create_model('isomix_resnet18'))


def test_non_finite_logits_are_an_error():
    model = timm.create_model('isomix_iso_64_8_p2')
    state = model.state_dict()
    state['schedule.mixture.logits'][0, 0] = float('nan')
    with pytest.raises(ValueError, match='non-finite mixture logits at schedule.mixture.logits'):
        model.load_state_dict(state)
    with torch.no_grad():
        model.schedule.mixture.logits[1, 1] = float('inf')
        with pytest.raises(ValueError, match='mixture logits are not finite'):
            model.eval()(torch.randn(1, 3, 32, 32))


def test_a_bad_temperature_is_an_error():
    with pytest.raises(ValueError, match='temperature must be a positive finite number'):
        timm.create_model('isomix_iso_64_8_p2', temperature=0.0)


def test_fresh_mixtures_start_soft_and_a_warm_start_makes_them_sharp():
    model = timm.create_model('isomix_resnet50', reuse=1)
    alpha = model.mixtures()['stages.2'].alpha()  # K = 5
    assert 0.9 < alpha.max(-1).values.min() < 0.95  # learnable: the softmax gradient is alive
    model.load_state_dict(resnet_to_isomix(timm.create_model('resnet50').state_dict(), model))
    alpha = model.mixtures()['stages.2'].alpha()
    assert alpha.max(-1).values.min() > 1 - 1e-6 and model.mixtures()['stages.2'].argmax_order() == [0, 1, 2, 3, 4]
    soft = timm.create_model('isomix_resnet50', reuse=1, init_logit=1.0).mixtures()['stages.2'].alpha()
    assert soft.max(-1).values.max() < 0.5
