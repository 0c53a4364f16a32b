"""Routing Networks over the template banks (issue 14): routers, grouped execution, learning rules, training.

Every model here is tiny (isomix_iso_64_8_p2 at width 16 or less, 8-16 px inputs), so the whole file runs in
seconds except the train.py and torchrun runs.
"""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import timm
import timm_isomix  # noqa: F401
from timm_isomix.bank import run_routed
from timm_isomix.models.routers import InputRouter, TaskRouter
from timm_isomix.train.optim import mixture_param_groups

from helpers import ROOT, make_tiny_folder

PY = sys.executable
SMALL = dict(width=16, num_classes=5)


def routed(routing='task', router='reinforce', **kw):
    torch.manual_seed(0)
    return timm.create_model('isomix_iso_64_8_p2', routing=routing, router=router, **{**SMALL, **kw})


def step(model, x, y, task=None):
    out = model(x, task=task)
    per = F.cross_entropy(out, y, reduction='none')
    return per.mean() + model.router.loss(per, out.argmax(-1) == y)


# --- model --------------------------------------------------------------------------------------
@pytest.mark.parametrize('routing,cls', [('task', TaskRouter), ('input', InputRouter)])
def test_routing_kwargs_build_a_router_over_the_bank_and_keep_the_templates(routing, cls):
    model = routed(routing, num_tasks=3)
    plain = timm.create_model('isomix_iso_64_8_p2', **SMALL)
    assert isinstance(model.router, cls) and model.router.num_tasks == 3
    assert model.router.num_layers == 8 and model.router.num_templates == 4
    assert model.schedule.mixture.is_hard  # templates run as they are; the router picks which
    assert model.bank.weight.shape == plain.bank.weight.shape
    assert model.schedule_args() == {'depth': 8}
    assert model.mixtures() == {}  # nothing is mixed: train.py logs and draws no mixture for a routed model


def test_training_samples_routes_and_eval_takes_the_argmax_unless_sampling_is_asked_for():
    model = routed('task')
    with torch.no_grad():
        model.router.logits[0] = F.one_hot(torch.tensor([3, 2, 1, 0, 0, 1, 2, 3]), 4) * 2.  # p(argmax) ~ 0.71
    x = torch.randn(64, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        model(x)
    assert (model.router.last_routes == torch.tensor([3, 2, 1, 0, 0, 1, 2, 3])).all()
    model.train()
    model(x)
    sampled = model.router.last_routes
    assert (sampled != torch.tensor([3, 2, 1, 0, 0, 1, 2, 3])).any()
    assert (sampled == torch.tensor([3, 2, 1, 0, 0, 1, 2, 3])).float().mean() > 0.5
    model.eval()
    model.router.sample = True
    with torch.no_grad():
        model(x)
    assert (model.router.last_routes != torch.tensor([3, 2, 1, 0, 0, 1, 2, 3])).any()


def test_per_input_routes_differ_between_examples_of_one_task_and_per_task_routes_do_not():
    x = torch.randn(32, 3, 8, 8)
    for routing, varies in (('task', False), ('input', True)):
        model = routed(routing).eval()
        for p in model.router.parameters():
            torch.nn.init.normal_(p, std=2.)
        with torch.no_grad():
            model(x)
        routes = model.router.last_routes
        assert bool((routes != routes[:1]).any()) == varies, routing


# --- grouped execution --------------------------------------------------------------------------
def test_a_route_fixed_for_the_whole_batch_gives_exactly_the_outputs_of_that_hard_order():
    """The hard order's layer l is the routed layer l with the statistics of the template it runs."""
    order = [2, 1, 0, 3, 3, 2, 1, 0]
    model = routed('task').eval()
    hard = timm.create_model('isomix_iso_64_8_p2', order=order, **SMALL).eval()
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith('router.'):
            continue
        if '.per_template.' in k:
            if 'running' in k:  # statistics that differ per template, so the test sees which set ran
                v = torch.rand_like(v) + 0.5
            head, rest = k.split('.per_template.')
            template, name = rest.split('.', 1)
            if int(template) != order[int(head.split('.')[-1])]:
                continue
            k = f'{head}.{name}'
        state[k] = v
    hard.load_state_dict(state)
    model.load_state_dict({**model.state_dict(), **{
        f'schedule.layers.{l}.per_template.{order[l]}.{n}': v for l in range(8)
        for n, v in hard.schedule.layers[l].state_dict().items()}})
    with torch.no_grad():
        model.router.logits[0] = F.one_hot(torch.tensor(order), 4) * 5.
        x = torch.randn(16, 3, 8, 8)
        assert torch.equal(model(x), hard(x))


def test_a_routed_layer_keeps_statistics_per_template_and_updates_only_those_that_ran():
    """Training normalizes each template's group with its own batch statistics; eval must use the same
    template's running statistics, so each template keeps its own and only a template that ran updates them."""
    model = routed('input').train()
    layer, bank = model.schedule.layers[0], model.bank
    assert len(layer.per_template) == bank.num_templates
    templates = bank.unflatten_rows(bank.weight, bank.affine, bank.num_templates)
    before = [m.bn1.running_mean.clone() for m in layer.per_template]
    with torch.no_grad():
        run_routed(layer, torch.randn(6, 16, 4, 4), templates, torch.tensor([1, 3, 1, 3, 3, 1]))
    changed = [not torch.equal(m.bn1.running_mean, b) for m, b in zip(layer.per_template, before)]
    assert changed == [False, True, False, True]


def test_grouped_execution_equals_running_every_example_on_its_own_template():
    torch.manual_seed(0)
    model = timm.create_model('isomix_iso_64_8_p2', order=[0] * 8, **SMALL).eval()
    layer, bank = model.schedule.layers[0], model.bank
    templates = bank.unflatten_rows(bank.weight, bank.affine, bank.num_templates)
    x = torch.randn(12, 16, 4, 4)
    index = torch.tensor([3, 0, 0, 2, 3, 1, 1, 0, 2, 2, 3, 0])
    gate = torch.ones(12)  # a straight-through gate is 1 in value
    with torch.no_grad():
        y = run_routed(layer, x, templates, index, gate)
        for b in range(12):
            ref = layer(x[b:b + 1], templates[index[b]]) * gate[b]
            torch.testing.assert_close(y[b:b + 1], ref, rtol=1e-5, atol=1e-6)


def test_the_straight_through_gate_is_exactly_one_forward_and_gives_the_products_gradients():
    torch.manual_seed(0)
    model = timm.create_model('isomix_iso_64_8_p2', order=[0] * 8, **SMALL).eval()
    layer, bank = model.schedule.layers[0], model.bank
    templates = bank.unflatten_rows(bank.weight, bank.affine, bank.num_templates)
    x, index = torch.randn(6, 16, 4, 4), torch.tensor([1, 3, 1, 0, 3, 1])
    grads = []
    for fused in (True, False):
        p = torch.rand(6, requires_grad=True)
        gate = 1. + p - p.detach()
        y = run_routed(layer, x, templates, index, gate if fused else None)
        if fused:
            assert torch.equal(y, run_routed(layer, x, templates, index))
        else:
            y = y * gate.view(-1, 1, 1, 1)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append(p.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_gradients_reach_only_the_templates_that_ran_and_every_bank_row_has_a_gradient():
    model = timm.create_model('isomix_iso_64_8_p2', order=[0] * 8, **SMALL).train()
    layer, bank = model.schedule.layers[0], model.bank
    templates = bank.unflatten_rows(bank.weight, bank.affine, bank.num_templates)
    x = torch.randn(6, 16, 4, 4)
    run_routed(layer, x, templates, torch.tensor([1, 3, 1, 3, 3, 1])).square().sum().backward()
    assert bank.weight.grad is not None  # zero rows, not a missing gradient: DDP needs no find_unused_parameters
    used = bank.affine.grad.abs().sum(1) > 0  # (the kernels' gradients are 0 here: zero-init last BN scale)
    assert used.tolist() == [False, True, False, True]


# --- learning rules -----------------------------------------------------------------------------
@pytest.mark.parametrize('routing', ['task', 'input'])
@pytest.mark.parametrize('router', ['reinforce', 'wpl', 'gumbel'])
def test_every_router_gives_every_parameter_a_gradient_in_one_step(routing, router):
    model = routed(routing, router, num_tasks=2).train()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # WPL's policy moves from the second step on (its values start equal)
        opt.zero_grad()
        step(model, x, y, task=torch.tensor([0, 1] * 4)).backward()
        opt.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert model.router.logits.grad.abs().sum() > 0 if routing == 'task' else \
        model.router.nets[0][2].weight.grad.abs().sum() > 0


@pytest.mark.parametrize('router', ['reinforce', 'wpl', 'gumbel'])
def test_a_router_learns_to_prefer_the_template_that_earns_reward(router):
    """A bandit over one layer: template 2 gives loss 0, the others loss 1; the route policy moves to 2."""
    torch.manual_seed(0)
    r = TaskRouter(1, 4, algorithm=router, tau=1.0).train()
    opt = torch.optim.SGD(r.parameters(), lr=0.5)
    x = torch.zeros(64, 1, 1, 1)
    for _ in range(60):
        index, gate = r.routes(x)(0, x)
        if router == 'gumbel':  # the gate carries the gradient: output = gate * (loss of the chosen template)
            loss = (gate * (index != 2).float()).mean()
        else:
            loss = r.loss((index != 2).float(), index == 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert r.policy()[0, 0].argmax() == 2 and r.policy()[0, 0, 2] > 0.6


def test_per_task_routes_drawn_per_task_are_the_same_for_all_examples_of_a_task_in_training():
    model = routed('task', 'reinforce', num_tasks=2, router_args={'draw': 'task'}).train()
    task = torch.tensor([0, 1] * 16)
    y = torch.randint(0, 5, (32,))
    for _ in range(3):
        step(model, torch.randn(32, 3, 8, 8), y, task=task).backward()
        routes = model.router.last_routes
        assert (routes[task == 0] == routes[0]).all() and (routes[task == 1] == routes[1]).all()
    default = routed('task', 'reinforce').train()
    default(torch.randn(32, 3, 8, 8))
    assert (default.router.last_routes != default.router.last_routes[0]).any()  # the reference's per-example draws


@pytest.mark.parametrize('draw', ['example', 'task'])
def test_a_router_drawing_per_task_learns_as_well(draw):
    torch.manual_seed(0)
    r = TaskRouter(1, 4, algorithm='reinforce', draw=draw).train()
    opt = torch.optim.SGD(r.parameters(), lr=0.5)
    x = torch.zeros(16, 1, 1, 1)
    for _ in range(150):
        index, _ = r.routes(x)(0, x)
        loss = r.loss((index != 2).float(), index == 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert r.policy()[0, 0].argmax() == 2 and r.policy()[0, 0, 2] > 0.6


def test_rewards_come_from_loss_or_correctness_and_pay_the_route_cost():
    r = TaskRouter(2, 3, algorithm='reinforce', reward='correct', cost=[0., 0.5, 1.]).train()
    x = torch.zeros(2, 1, 1, 1)
    route = r.routes(x)
    with torch.no_grad():
        r.logits.fill_(0.)
    route(0, x), route(1, x)
    idx = r.last_routes.t()
    returns = r._returns(r.rewards(torch.zeros(2), torch.tensor([True, False])), r._task, idx)
    cost = torch.tensor([0., 0.5, 1.])[idx]
    assert torch.allclose(returns[1], torch.tensor([1., -1.]) - cost[1])
    assert torch.allclose(returns[0], torch.tensor([1., -1.]) - cost[0] - cost[1])
    assert torch.equal(TaskRouter(2, 3, reward='loss').rewards(torch.tensor([0.3]), torch.tensor([True])),
                       torch.tensor([-0.3]))


def test_collaboration_reward_favours_the_templates_other_tasks_use():
    r = TaskRouter(1, 2, num_tasks=2, algorithm='wpl', collab=1.0).train()
    r.usage[1, 0] = torch.tensor([0.9, 0.1])  # task 1 mostly runs template 0
    task, idx = torch.tensor([0, 0]), torch.tensor([[0, 1]])
    returns = r._returns(torch.zeros(2), task, idx)
    assert torch.allclose(returns[0], torch.tensor([0.9, 0.1]))


def test_a_routed_model_can_be_deep_copied_between_its_forward_and_its_loss():
    import copy
    model = routed('input', 'reinforce').train()
    out = model(torch.randn(4, 3, 8, 8))
    ema = copy.deepcopy(model)  # e.g. timm's ModelEmaV3 after a step
    assert ema.router._decisions == [] and len(model.router._decisions) == 8
    assert model.router.loss(out.sum(-1), out.argmax(-1) == 0).requires_grad


def test_gumbel_temperature_follows_its_schedule():
    r = TaskRouter(1, 2, algorithm='gumbel', tau=2.0, tau_end=0.5)
    assert r.tau() == 2.0
    r.set_progress(0.5)
    assert r.tau() == pytest.approx(1.0)
    r.set_progress(1.0)
    assert r.tau() == pytest.approx(0.5)


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize('kwargs,message', [
    (dict(routing='layer'), "unknown routing mode 'layer'"),
    (dict(routing='task', router='dqn'), "unknown router 'dqn'"),
    (dict(routing='task', order=[0, 1, 2, 3]), 'cannot run on a hard order'),
    (dict(router='wpl'), 'without routing'),
    (dict(routing='input', router_args={'temperature': 2}), "unknown router_args ['temperature']"),
    (dict(routing='task', router_args={'hidden': 8}), "routing='task' has none"),
    (dict(routing='input', router_args={'draw': 'task'}), "draw='task' is for routing='task'"),
    (dict(routing='task', router_args={'draw': 'batch'}), "unknown router draw 'batch'"),
])
def test_bad_routing_arguments_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError) as e:
        timm.create_model('isomix_iso_64_8_p2', **SMALL, **kwargs)
    assert message in str(e.value)


def test_a_task_id_outside_the_models_tasks_is_refused():
    model = routed('input', num_tasks=2).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"task 2 is outside the model's tasks 0\.\.1"):
        model(x, task=2)
    with pytest.raises(ValueError, match='outside the model'):
        model(x, task=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match='a routed model has no schedule'):
        model.set_schedule(reuse=3)


# --- optimizer and train.py ----------------------------------------------------------------------
def test_router_parameters_form_their_own_group_without_weight_decay_at_their_own_lr():
    model = routed('input', 'reinforce')
    groups = mixture_param_groups(model, weight_decay=0.05, lr=0.1, router_lr=0.003)
    router = [g for g in groups if g.get('group_name') == 'router']
    assert len(router) == 1 and router[0]['lr'] == 0.003 and router[0]['weight_decay'] == 0.
    assert {id(p) for p in router[0]['params']} == {id(p) for p in model.router.parameters()}
    others = {id(p) for g in groups if g.get('group_name') != 'router' for p in g['params']}
    assert not others & {id(p) for p in model.router.parameters()}


def test_router_flags_need_routing_and_become_model_kwargs():
    from timm_isomix.train.config import ConfigError, parse_train_args
    args, _ = parse_train_args(['--routing', 'input', '--router', 'gumbel', '--router-tau', '2',
                                '--router-cost', '0.1'])
    assert args.model_kwargs == {'routing': 'input', 'router': 'gumbel', 'router_args': {'tau': 2.0, 'cost': 0.1}}
    with pytest.raises(ConfigError, match='need --routing'):
        parse_train_args(['--router', 'wpl'])


def test_router_yaml_keys_are_checked_like_flags(tmp_path):
    from timm_isomix.train.config import ConfigError, parse_train_args
    good = tmp_path / 'good.yaml'
    good.write_text('routing: task\nrouter: wpl\nrouter_lr: 0.03\nrouter_collab: 0.09\nrouter_draw: task\n')
    args, _ = parse_train_args(['-c', str(good)])
    assert args.router_lr == 0.03
    assert args.model_kwargs == {'routing': 'task', 'router': 'wpl', 'router_args': {'collab': 0.09, 'draw': 'task'}}
    bad = tmp_path / 'bad.yaml'
    bad.write_text('routing: layer\n')
    with pytest.raises(ConfigError, match="key 'routing' must be one of"):
        parse_train_args(['-c', str(bad)])


@pytest.fixture(scope='module')
def tiny_cifar(shared_dataset, tmp_path_factory):
    return make_tiny_folder(shared_dataset('cifar10'), tmp_path_factory.mktemp('tiny_cifar_routing'), 4, 2)


def _train_cmd(data, out, experiment, *extra):
    return [str(ROOT / 'train.py'), '--data-dir', str(data), '--model', 'isomix_iso_64_8_p2', '--model-kwargs',
            'width=16', '--img-size', '16', '-b', '8', '-j', '0', '--opt', 'adamw', '--lr', '2e-3',
            '--warmup-epochs', '0', '--epochs', '1', '--val-split', 'val', '--device', 'cpu', '--log-interval', '2',
            '--output', str(out), '--experiment', experiment, *extra]


def _run(cmd):
    import os
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_train_py_trains_a_router_and_its_checkpoint_rebuilds_the_routed_model(tiny_cifar, tmp_path):
    result = _run([PY] + _train_cmd(tiny_cifar, tmp_path, 'wpl', '--routing', 'task', '--router', 'wpl',
                                    '--router-lr', '0.05', '--router-reward', 'correct'))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / 'wpl' / 'last.pth.tar', map_location='cpu', weights_only=True)
    args = ckpt['model_args']
    assert args['routing'] == 'task' and args['router'] == 'wpl' and args['router_args'] == {'reward': 'correct'}
    model = timm.create_model(ckpt['arch'], **args)
    model.load_state_dict(ckpt['state_dict'])
    assert not torch.equal(model.router.value, torch.zeros_like(model.router.value))  # the values learned
    groups = {g.get('group_name'): g for g in ckpt['optimizer']['param_groups']}
    assert groups['router']['initial_lr'] == 0.05 and groups['router']['weight_decay'] == 0.


def test_torchrun_trains_per_input_routes_with_two_cpu_processes(tiny_cifar, tmp_path):
    """With 4 examples per rank, some templates go unused at some layer on some rank in most steps: their bank
    rows get zero gradients (the bank is one parameter), so DDP needs no find_unused_parameters."""
    cmd = [PY, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    cmd += _train_cmd(tiny_cifar, tmp_path, 'ddp', '--routing', 'input', '--router', 'reinforce', '-b', '4')
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'process 1 of 2' in result.stderr
    ckpt = torch.load(tmp_path / 'ddp' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['model_args']['routing'] == 'input' and 'router.nets.0.0.weight' in ckpt['state_dict']


# --- the timm contract (eval mode) ---------------------------------------------------------------
from test_timm_suite import timm_tests  # noqa: E402,F401  (the fixture: timm's own tests/test_models.py)

ROUTED = [('isomix_iso_64_8_p2', 'input', 'gumbel'), ('isomix_iso_64_8_p2', 'task', 'wpl'),
          ('isomix_resnet26', 'input', 'reinforce')]


@pytest.fixture
def routed_timm_tests(timm_tests, monkeypatch):  # noqa: F811
    """timm's test functions, whose create_model builds the model with routing kwargs."""
    def use(routing, router):
        def create(name, *args, **kwargs):
            return timm.create_model(name, *args, routing=routing, router=router, **kwargs)
        monkeypatch.setattr(timm_tests, 'create_model', create)
        return timm_tests
    return use


@pytest.mark.parametrize('model_name,routing,router', ROUTED)
def test_routed_models_pass_timms_forward_features_and_intermediates_tests_in_eval(
        routed_timm_tests, model_name, routing, router, one_thread):
    t = routed_timm_tests(routing, router)
    t.test_model_forward(model_name, 2)
    t.test_model_forward_features(model_name, 2)
    t.test_model_forward_intermediates_features(model_name, 2)
    t.test_model_forward_intermediates(model_name, 2)


@pytest.mark.parametrize('model_name,routing,router', ROUTED[:2])
def test_fx_tracing_cannot_follow_per_example_routes_and_fails_loudly(routed_timm_tests, model_name, routing,
                                                                     router):
    """The group sizes of a routed layer are data (bank.run_routed); symbolic tracing must raise, not
    produce a graph with the routes of one example batch baked in."""
    with pytest.raises(Exception, match='tolist|symbolically traced|Proxy'):
        routed_timm_tests(routing, router).test_model_forward_fx(model_name, 1)


# --- multi-task ------------------------------------------------------------------------------------
def _task_sets(n=24, size=8, classes=3, seed=0):
    from torch.utils.data import TensorDataset
    g = torch.Generator().manual_seed(seed)
    return {t: TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))
            for t in ('a', 'b')}


@pytest.mark.parametrize('routing,router', [('task', 'wpl'), ('input', 'gumbel')])
def test_multi_task_training_trains_the_router_and_reports_route_usage_per_task_and_class(routing, router, tmp_path,
                                                                                          one_thread):
    from timm_isomix.tasks.fit import fit_tasks
    from timm_isomix.models.routed_multitask import build_routed_task_model
    from timm_isomix.tasks.route_usage import plot_route_usage, route_usage
    torch.manual_seed(0)
    model = build_routed_task_model('isomix_iso_64_8_p2', {'a': 3, 'b': 3}, routing=routing, router=router,
                                    router_args={'collab': 0.1} if router == 'wpl' else {'tau': 2., 'tau_end': 0.5},
                                    width=16)
    before = {n: p.detach().clone() for n, p in model.router.named_parameters()}
    sets = _task_sets()
    history = fit_tasks(model, sets, sets, epochs=2, batch_size=8, router_lr=0.1)
    assert len(history) == 2 and {'a_top1', 'b_top1'} <= set(history[-1])
    moved = [n for n, p in model.router.named_parameters() if not torch.equal(p, before[n])]
    assert moved, 'the router did not learn'
    assert model.router.progress == pytest.approx((1 + 2 / 3) / 2)  # the last step of epoch 2 of 2, 3 steps each
    usage = route_usage(model, sets)
    for task in ('a', 'b'):
        assert usage['per_task'][task].shape == (8, 4)
        assert torch.allclose(usage['per_task'][task].sum(-1), torch.ones(8))
        assert set(usage['per_class'][task]) <= {0, 1, 2}
    if routing == 'task':  # one route per task: one-hot rows, the same for every class
        assert ((usage['per_task']['a'] == 0) | (usage['per_task']['a'] == 1)).all()
    assert usage['js_per_layer'].shape == (8,)
    paths = plot_route_usage(usage, tmp_path)
    assert all(p.is_file() and p.read_bytes()[:4] == b'\x89PNG' for p in paths)


def test_a_routed_multi_task_model_refuses_unknown_tasks_and_too_few_router_tasks():
    from timm_isomix.models.routed_multitask import RoutedMultiTask, build_routed_task_model
    model = build_routed_task_model('isomix_iso_64_8_p2', {'a': 3}, width=16)
    with pytest.raises(KeyError, match="unknown task 'c'"):
        model(torch.randn(1, 3, 8, 8), task='c')
    trunk = timm.create_model('isomix_iso_64_8_p2', width=16, num_classes=0, routing='task', num_tasks=1)
    with pytest.raises(ValueError, match='num_tasks=2'):
        RoutedMultiTask(trunk, {'a': 3, 'b': 3})


DDP_SCRIPT = '''
import argparse, torch, torch.distributed as dist
from torch.utils.data import TensorDataset
from timm_isomix.train.distributed import setup_distributed
from timm_isomix.tasks.fit import fit_tasks
from timm_isomix.models.routed_multitask import build_routed_task_model
args = argparse.Namespace(device='cpu', dist_backend=None, dist_url='env://')
setup_distributed(args)
torch.manual_seed(0)
model = build_routed_task_model('isomix_iso_64_8_p2', {'a': 3, 'b': 3}, routing='input', router='reinforce', width=8)
g = torch.Generator().manual_seed(1)
sets = {t: TensorDataset(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for t in 'ab'}
fit_tasks(model, sets, None, epochs=1, batch_size=2, distributed=True)
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
both = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(both, flat)
assert torch.equal(both[0], both[1]), 'ranks diverged'
if dist.get_rank() == 0:
    print('ranks agree')
dist.destroy_process_group()
'''


def test_torchrun_multi_task_routing_with_two_cpu_processes_keeps_the_ranks_in_step(tmp_path):
    """Batches of 2 examples per task and rank: most templates go unused at most layers on each rank."""
    script = tmp_path / 'ddp_routing.py'
    script.write_text(DDP_SCRIPT)
    result = _run([PY, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'ranks agree' in result.stdout


def test_pruning_intermediate_layers_truncates_the_router_and_leaves_no_unused_parameter(routed_timm_tests):
    """timm's prune test (training mode) with a Gumbel router, whose parameters learn through the features."""
    routed_timm_tests('input', 'gumbel').test_prune_intermediate_layers_params_used('isomix_iso_64_8_p2')
    model = routed('task', 'wpl')
    model.prune_intermediate_layers([2])
    assert model.router.num_layers == 3 and model.router.logits.shape == (1, 3, 4) and model.router.value.shape[1] == 3


def test_the_routing_benchmark_reports_every_case_with_its_ratio(tmp_path, one_thread):
    from timm_isomix.tools.bench_routing import STEP_CASES, main
    out = tmp_path / 'bench.json'
    report = main(['--batch', '4', '--reps', '1', '--steps', '1', '--warmup', '0', '--out', str(out)])
    names = {'layer_train', 'layer_infer'} | {f'step_{t}{n}' for t in ('', 'study_trunk_') for n, *_ in STEP_CASES}
    assert set(report['results']) == names and out.is_file()
    assert all(r['ratio'] > 0 and r['plain_ms'] > 0 for r in report['results'].values())
    assert report['command'].endswith('--out ' + str(out)) and report['target_ratio'] == 1.15


# --- train.py --tasks with routing ----------------------------------------------------------------
TASK_TRUNK = {'width': 16, 'depth': 4, 'num_templates': 2}


@pytest.mark.parametrize('bad', [{'share_from': 0}, {'patch': True}, {'hard_shared': True}, {'independent': True},
                                 {'mixture_init': 'random'}, {'share_head': True}])
def test_a_routed_task_config_refuses_the_mixture_models_options(bad):
    from timm_isomix.tasks.train_tasks import build_task_model
    cfg = {'model_kwargs': {**TASK_TRUNK, 'routing': 'task'}, 'tasks': [{'name': 'a', 'data': 'x', 'classes': 3}]}
    with pytest.raises(ValueError, match=rf"\['{next(iter(bad))}'\] are mixture-model options"):
        build_task_model({**cfg, **bad})
    with pytest.raises(ValueError, match='router_lr 0.1 needs a routed model'):
        build_task_model({**cfg, 'model_kwargs': TASK_TRUNK, 'router_lr': 0.1})


def test_task_files_routing_keys_build_a_routed_model_and_command_line_flags_override_the_file(tmp_path):
    from timm_isomix.tasks.train_tasks import build_task_model, config_from_flags
    from timm_isomix.models.routed_multitask import RoutedMultiTask
    from timm_isomix.train.config import command_line_flags, parse_train_args
    plain = tmp_path / 'plain.yaml'
    plain.write_text('model_kwargs: {width: 16, depth: 4, num_templates: 2}\n'
                     'tasks: [{name: a, data: x, classes: 3}, {name: b, data: x, classes: 2}]\n')
    flags = ['--routing', 'input', '--router', 'gumbel', '--router-tau', '2', '--router-lr', '0.05']
    config = config_from_flags(parse_train_args(['--tasks', str(plain)] + flags)[0])
    assert config.router_lr == 0.05
    assert config.model_kwargs == {**TASK_TRUNK, 'routing': 'input', 'router': 'gumbel', 'router_args': {'tau': 2.0}}
    model = build_task_model(config)
    assert isinstance(model, RoutedMultiTask) and isinstance(model.router, InputRouter)
    assert model.router.num_tasks == 2 and model(torch.randn(2, 3, 8, 8), task='b').shape == (2, 2)
    routed_file = tmp_path / 'routed.yaml'
    routing = 'num_templates: 2, routing: task, router: wpl, router_args: {collab: 0.1}'
    routed_file.write_text(plain.read_text().replace('num_templates: 2', routing) + 'router_lr: 0.2\n')
    argv = ['--tasks', str(routed_file)] + flags
    config = config_from_flags(parse_train_args(argv)[0], command_line_flags(argv))  # as with -c: the flags win
    assert config.router_lr == 0.05
    assert (config.model_kwargs['routing'], config.model_kwargs['router']) == ('input', 'gumbel')
    assert config.model_kwargs['router_args'] == {'tau': 2.0, 'collab': 0.1}
    config = config_from_flags(parse_train_args(['--tasks', str(routed_file)])[0], set())  # the file over defaults
    assert config.router_lr == 0.2 and config.model_kwargs['router'] == 'wpl'


def test_the_routing_digits_task_file_builds_a_per_task_wpl_model():
    from timm_isomix.tasks.train_tasks import build_task_model, read_task_config
    config = read_task_config(ROOT / 'hparams' / 'routing_digits.yaml')
    model = build_task_model(config)
    assert isinstance(model.router, TaskRouter) and model.router.algorithm == 'wpl' and config.router_lr == 0.03
    assert list(model.task_ids) == ['mnist', 'usps', 'mnistm', 'cifar10'] and model.router.num_tasks == 4


@pytest.fixture(scope='module')
def tiny_digits(shared_dataset, tmp_path_factory):
    """USPS and MNIST, 2 training and 1 validation image per class."""
    root = tmp_path_factory.mktemp('tiny_digits_routing')
    return {n: make_tiny_folder(shared_dataset(n), root / n, 2, 1) for n in ('usps', 'mnist')}


def _task_file(path, digits, **model_kwargs):
    import yaml
    path.write_text(yaml.safe_dump({
        'model': 'isomix_iso_64_8_p2', 'model_kwargs': {**TASK_TRUNK, **model_kwargs}, 'img_size': 16, 'epochs': 1,
        'batch_size': 8, 'tasks': [{'name': n, 'data': str(d), 'classes': 10} for n, d in digits.items()]}))
    return path


def _check_routed_run(out, routing):
    from timm_isomix.tasks.train_tasks import load_task_model
    results = json.loads((out / 'results.json').read_text())
    for name in ('model.pth', 'summary.csv', 'routes.png', 'routes-sharing.png'):
        assert (out / name).is_file(), name
    assert not (out / 'mixtures.png').exists() and not list(out.glob('task_*.pth'))  # no mixtures to show
    assert set(results['routes']) == {'usps', 'mnist'} and len(results['js_per_layer']) == 4
    for frequencies in results['routes'].values():  # (layers, templates): each layer's frequencies sum to one
        assert torch.allclose(torch.tensor(frequencies).sum(-1), torch.ones(4))
    model = load_task_model(out / 'model.pth').eval()
    assert isinstance(model.router, {'task': TaskRouter, 'input': InputRouter}[routing])
    assert model(torch.randn(2, 3, 16, 16), task='mnist').shape == (2, 10)
    return model, results


def test_train_py_tasks_trains_per_task_wpl_and_per_input_gumbel_routers(tiny_digits, tmp_path, monkeypatch,
                                                                         one_thread):
    """Routing from the task file (per-task WPL) and from train.py's flags (per-input Gumbel), in one process."""
    import timm_isomix.tasks.train_tasks as multitask
    from helpers import load_script
    router_lrs = []

    def fit_tasks(*args, **kwargs):  # the real training, recording the router's learning rate
        router_lrs.append(kwargs['router_lr'])
        return real_fit(*args, **kwargs)
    real_fit = multitask.fit_tasks
    monkeypatch.setattr(multitask, 'fit_tasks', fit_tasks)
    main = load_script('train').main
    wpl = _task_file(tmp_path / 'wpl.yaml', tiny_digits, routing='task', router='wpl', router_args={'collab': 0.1})
    assert main(['--tasks', str(wpl), '--router-lr', '0.3', '--output', str(tmp_path), '--experiment', 'wpl']) == 0
    model, _ = _check_routed_run(tmp_path / 'wpl', 'task')
    assert model.router.algorithm == 'wpl' and model.router.collab == 0.1
    assert not torch.equal(model.router.value, torch.zeros_like(model.router.value))  # the values learned
    plain = _task_file(tmp_path / 'plain.yaml', tiny_digits)
    assert main(['--tasks', str(plain), '--routing', 'input', '--router', 'gumbel', '--router-tau', '2',
                 '--router-tau-end', '0.5', '--output', str(tmp_path), '--experiment', 'gumbel']) == 0
    model, results = _check_routed_run(tmp_path / 'gumbel', 'input')
    assert model.router.algorithm == 'gumbel' and (model.router.tau_start, model.router.tau_end) == (2., 0.5)
    assert results['params'] == sum(p.numel() for p in model.parameters())
    assert router_lrs == [0.3, None]  # the flag fills the file's silence; none given: the router trains at lr


def test_torchrun_trains_routed_tasks_from_a_task_file_with_two_cpu_processes(tiny_digits, tmp_path):
    """Per-input routes, 2 examples per task and rank: most templates go unused at most layers on each rank."""
    task_file = _task_file(tmp_path / 'ddp.yaml', tiny_digits, routing='input', router='reinforce')
    cmd = [PY, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(ROOT / 'train.py'),
           '--tasks', str(task_file), '-b', '2', '--router-lr', '0.01', '--output', str(tmp_path),
           '--experiment', 'ddp']
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'process 1 of 2' in result.stderr
    model, results = _check_routed_run(tmp_path / 'ddp', 'input')
    assert len(results['history']) == 1 and set(results['top1']) == {'usps', 'mnist'}
    assert not (tmp_path / 'ddp-1').exists()  # only rank 0 writes
