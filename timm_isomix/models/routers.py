"""Routers: Routing Networks (Rosenbaum, Klinger, Riemer, ICLR 2018, arXiv:1711.01239) over a template bank.

A router replaces a schedule's mixture: at each executed layer l it picks, for each example, one template
of the layer's bank, which then runs as it is (`bank.run_routed` runs the examples grouped by template).
The paper's recursion is the trunk itself: every executed layer is one more decision over the same bank.

- routing='task': `TaskRouter`, a table of policy logits per task and layer (the paper's tabular agents,
  one per task); every example of a task follows the same policy.
- routing='input': `InputRouter`, per layer a small net on the layer's pooled input (detached, as the
  reference code's approximators) and a learned task embedding.

How a router learns (router='...'):
- 'reinforce': REINFORCE, loss -(R - b) log pi(a), with a learned baseline b per task and layer;
- 'wpl': the Weighted Policy Learner (Abdallah & Lesser 2006; the paper's Algorithm 3), one agent per task,
  with a learned value Q(a) per task, layer and template (regressed on the returns of the routes taken).
  For every template a, delta(a) = Q(a) - sum_a' pi(a') Q(a') and WPL's weighted step is
  w(a) = delta(a) * pi(a) if delta(a) < 0 else delta(a) * (1 - pi(a)): moves away from a bad template slow
  down as its probability nears 0, moves towards a good one as it nears 1. The step is taken through the
  log-policy, loss -sum_a stopgrad(w(a)) log pi(a) with pi = softmax(logits), so the policy stays on the
  simplex without WPL's projection and trains with any optimizer (the reference code's master branch
  also regresses log pi; its delta = R - V(a) vanishes once V(a) is learned for a deterministic reward);
- 'gumbel': straight-through Gumbel-softmax: the sampled template's output is scaled by
  1 + y_a - stopgrad(y_a) (1 forward, the soft sample's gradient backward), no RL loss; the temperature
  goes from `tau` to `tau_end` geometrically over training (`set_progress`).

The reward of an example is its negated task loss (reward='loss') or +1 / -1 for a correct / wrong
prediction (reward='correct'). Each decision also earns `collab` times the frequency with which the other
tasks choose that template at that layer (the paper's collaboration reward; a running average), and pays
`cost` per route (a number, or one per template). The return of layer l's decision is the final reward
plus the per-decision rewards from layer l on (undiscounted reward-to-go, as the reference code).

Training samples the routes, eval takes the argmax; set `router.sample = True` (or False) to force either.
A per-task router draws a route per example from its task's policy (draw='example', as the reference code's
per-task agents do), or one route per task and batch (draw='task': every example of a task runs the same
templates, so the batch runs as a hard order, and each decision's reward is its examples' mean).
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['ROUTINGS', 'ROUTERS', 'REWARDS', 'DRAWS', 'Router', 'TaskRouter', 'InputRouter', 'build_router', 'task_ids',
           'routing_loss']

ROUTINGS = ('task', 'input')
DRAWS = ('example', 'task')
ROUTERS = ('reinforce', 'wpl', 'gumbel')
REWARDS = ('loss', 'correct')
# Momentum of the running template-usage frequencies (collaboration reward, route reports): about the
# last 100 steps, as the reference code's window of the last 256 decisions.
USAGE_MOMENTUM = 0.01
TaskIds = Optional[Union[int, torch.Tensor]]


def task_ids(task: TaskIds, batch_size: int, num_tasks: int, device) -> torch.Tensor:
    """Task id per example (B,): one int for the whole batch, a tensor of ids, or None (task 0)."""
    if task is None:
        task = 0
    if isinstance(task, bool) or not isinstance(task, (int, torch.Tensor)):
        raise ValueError(f'task must be an int or a tensor of task ids, got {task!r}')
    if isinstance(task, int):
        if not 0 <= task < num_tasks:
            raise ValueError(f'task {task} is outside the model\'s tasks 0..{num_tasks - 1} (num_tasks={num_tasks})')
        return torch.full((batch_size,), task, dtype=torch.long, device=device)
    task = task.to(device=device, dtype=torch.long).reshape(-1)
    if task.numel() == 1:
        task = task.expand(batch_size)
    if task.numel() != batch_size:
        raise ValueError(f'{task.numel()} task ids given for a batch of {batch_size}')
    lo, hi = int(task.min()), int(task.max())
    if lo < 0 or hi >= num_tasks:
        raise ValueError(f'task ids {sorted({lo, hi})} are outside the model\'s tasks 0..{num_tasks - 1} '
                         f'(num_tasks={num_tasks})')
    return task


class Router(nn.Module):
    """Chooses one template per example at each executed layer of one schedule, and learns from rewards."""

    def __init__(
            self,
            num_layers: int,
            num_templates: int,
            num_tasks: int = 1,
            algorithm: str = 'reinforce',
            reward: str = 'loss',
            cost: Union[float, Sequence[float]] = 0.,
            collab: float = 0.,
            tau: float = 1.0,
            tau_end: Optional[float] = None,
            draw: str = 'example',
            device=None,
            dtype=None,
    ):
        super().__init__()
        if draw not in DRAWS:
            raise ValueError(f'unknown router draw {draw!r}; expected one of {DRAWS}')
        if algorithm not in ROUTERS:
            raise ValueError(f'unknown router {algorithm!r}; expected one of {ROUTERS}')
        if reward not in REWARDS:
            raise ValueError(f'unknown router reward {reward!r}; expected one of {REWARDS}')
        if int(num_tasks) < 1:
            raise ValueError(f'a router needs at least one task, got num_tasks={num_tasks}')
        tau_end = tau if tau_end is None else tau_end
        if not (tau > 0 and tau_end > 0 and math.isfinite(tau) and math.isfinite(tau_end)):
            raise ValueError(f'Gumbel temperatures must be positive and finite, got tau={tau}, tau_end={tau_end}')
        cost = [float(cost)] * num_templates if isinstance(cost, (int, float)) else [float(c) for c in cost]
        if len(cost) != num_templates:
            raise ValueError(f'router cost needs one number or one per template ({num_templates}), got {len(cost)}')
        self.num_layers, self.num_templates, self.num_tasks = num_layers, num_templates, int(num_tasks)
        self.algorithm, self.reward, self.collab, self.draw = algorithm, reward, float(collab), draw
        self.tau_start, self.tau_end, self.progress = float(tau), float(tau_end), 0.
        self.sample: Optional[bool] = None  # None: sample in training, argmax in eval
        dd = dict(device=device, dtype=dtype)
        self.register_buffer('cost', torch.tensor(cost, device=device, dtype=torch.float32), persistent=False)
        self.register_buffer('usage', torch.full((self.num_tasks, num_layers, num_templates), 1. / num_templates,
                                                 device=device, dtype=torch.float32))
        self.baseline = nn.Parameter(torch.zeros(self.num_tasks, num_layers, **dd)) \
            if algorithm == 'reinforce' else None
        self.value = nn.Parameter(torch.zeros(self.num_tasks, num_layers, num_templates, **dd)) \
            if algorithm == 'wpl' else None
        self._decisions: List[Dict[str, torch.Tensor]] = []
        self._task: Optional[torch.Tensor] = None
        self.last_routes: Optional[torch.Tensor] = None  # (B, L) templates of the last forward, for reports
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A uniform policy, zero baseline and values, uniform usage."""
        if self.usage.device.type == 'meta':
            return
        self.usage.fill_(1. / self.num_templates)
        for p in (self.baseline, self.value, getattr(self, 'logits', None)):
            if p is not None:
                p.zero_()

    # --- policy ----------------------------------------------------------------------------
    def policy_logits(self, l: int, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of layer l's policy for each example."""
        raise NotImplementedError

    def tau(self) -> float:
        """The Gumbel-softmax temperature at the current training progress (geometric from tau to tau_end)."""
        return self.tau_start * (self.tau_end / self.tau_start) ** self.progress

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] (epochs done / epochs), for the temperature schedule."""
        self.progress = min(max(float(progress), 0.), 1.)

    def routes(self, x: torch.Tensor, task: TaskIds = None):
        """Start a forward over batch `x`: returns route(l, x_l) -> (template per example, gate or None)."""
        self._task = task = task_ids(task, x.shape[0], self.num_tasks, x.device)
        self._decisions = []
        sample = self.training if self.sample is None else self.sample
        learn = self.training and torch.is_grad_enabled()
        chosen: List[torch.Tensor] = []

        # draw='task': one draw per task in the batch (a representative row each), then expanded to its examples
        inverse = torch.unique(task, return_inverse=True)[1] if self.draw == 'task' else None
        rows = None if inverse is None else torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=task.device) \
            .scatter_(0, inverse, torch.arange(len(task), device=task.device))

        def route(l: int, h: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
            logits = self.policy_logits(l, h, task).float()
            drawn = logits if rows is None else logits[rows]
            gate = None
            if self.algorithm == 'gumbel':
                if sample:
                    y = F.gumbel_softmax(drawn, tau=self.tau(), hard=False)
                    index = y.argmax(-1)
                    if learn:
                        y_a = y.gather(1, index[:, None]).squeeze(1)
                        gate = 1. + y_a - y_a.detach()
                else:
                    index = drawn.argmax(-1)
            else:
                # a draw from softmax(drawn) by the Gumbel-max trick (a few element-wise ops; multinomial is slower)
                index = (drawn - torch.empty_like(drawn).exponential_().log()).argmax(-1) if sample \
                    else drawn.argmax(-1)
            if inverse is not None:
                index, gate = index[inverse], None if gate is None else gate[inverse]
            if learn and self.algorithm != 'gumbel':
                self._decisions.append({'layer': l, 'index': index, 'log_pi': logits.log_softmax(-1)})
            chosen.append(index)
            if len(chosen) == self.num_layers:
                self.last_routes = torch.stack(chosen, 1).detach()
            return index, gate
        return route

    @torch.no_grad()
    def truncate(self, num_layers: int) -> None:
        """Keep the decisions of the first `num_layers` layers only (the schedule was truncated)."""
        self.num_layers = num_layers
        self.usage = self.usage[:, :num_layers].clone()
        for name in ('baseline', 'value', 'logits'):
            p = getattr(self, name, None)
            if p is not None:
                setattr(self, name, nn.Parameter(p[:, :num_layers].clone(), p.requires_grad))
        if hasattr(self, 'nets'):
            self.nets = self.nets[:num_layers]

    def alpha(self, task: int = 0) -> torch.Tensor:
        """How often each template is chosen per layer (L, K) for a task: the running usage frequencies."""
        return self.usage[task].detach().clone()

    # --- learning ----------------------------------------------------------------------------
    def rewards(self, loss: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
        """Final reward per example from its task loss (B,) and correctness (B,), as `reward` says."""
        if self.reward == 'loss':
            return -loss.detach().float()
        return correct.detach().float() * 2. - 1.

    def loss(self, loss: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
        """The router's loss for the last training forward, from each example's task loss and correctness.

        REINFORCE and WPL: policy term plus the regression of their baseline / values on the returns.
        Gumbel: zero (its gradient flows through the gates). Updates the running usage frequencies.
        """
        routes = self.last_routes
        if routes is None or self._task is None or not self.training:
            return loss.new_zeros(())
        task, idx = self._task, routes.t()  # (L, B)
        returns = self._returns(self.rewards(loss, correct), task, idx)  # (L, B)
        self._update_usage(task, idx)
        decisions, self._decisions = self._decisions, []
        if not decisions:
            return returns.new_zeros(())
        # all decisions at once (D layers): per layer the mean over examples, summed over layers
        layers = [d['layer'] for d in decisions]
        log_pi = torch.stack([d['log_pi'] for d in decisions])  # (D, B, K)
        a, ret = idx[layers], returns[layers]  # (D, B)
        if self.algorithm == 'reinforce':
            b = self.baseline[task][:, layers].t().float()  # (D, B)
            log_pi_a = log_pi.gather(2, a[..., None]).squeeze(2)
            return -((ret - b).detach() * log_pi_a).mean(1).sum() + 0.5 * ((b - ret) ** 2).mean(1).sum()
        q = self.value[task][:, layers].transpose(0, 1).float()  # wpl: (D, B, K)
        pi = log_pi.detach().exp()
        delta = (q - (pi * q).sum(-1, keepdim=True)).detach()
        step = torch.where(delta < 0, delta * pi, delta * (1. - pi))
        q_a = q.gather(2, a[..., None]).squeeze(2)
        return -(step * log_pi).sum(-1).mean(1).sum() + 0.5 * ((q_a - ret) ** 2).mean(1).sum()

    def _returns(self, final: torch.Tensor, task: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Per layer, the final reward plus the per-decision rewards (collaboration, cost) from that layer on."""
        step = -self.cost[idx]  # (L, B)
        if self.collab:
            step = step + self.collab * self._others_usage(task).gather(2, idx.t()[..., None]).squeeze(2).t()
        to_go = step.flip(0).cumsum(0).flip(0)
        return final[None] + to_go

    def _others_usage(self, task: torch.Tensor) -> torch.Tensor:
        """(B, L, K): for each example, the mean usage of the other tasks (its own task's when it is alone)."""
        if self.num_tasks == 1:
            return self.usage[task]
        return (self.usage.sum(0, keepdim=True) - self.usage[task]) / (self.num_tasks - 1)

    @torch.no_grad()
    def _update_usage(self, task: torch.Tensor, idx: torch.Tensor) -> None:
        one_hot = F.one_hot(idx.t(), self.num_templates).float()  # (B, L, K)
        sums = torch.zeros_like(self.usage).index_add_(0, task, one_hot)
        counts = torch.bincount(task, minlength=self.num_tasks).float()
        seen = counts > 0
        freq = sums[seen] / counts[seen, None, None]
        self.usage[seen] = (1 - USAGE_MOMENTUM) * self.usage[seen] + USAGE_MOMENTUM * freq

    def __getstate__(self):  # deepcopy / pickle (EMA copies, checkpoints): pending decisions hold autograd graphs
        return {**self.__dict__, '_decisions': []}

    def extra_repr(self) -> str:
        return (f'num_layers={self.num_layers}, num_templates={self.num_templates}, num_tasks={self.num_tasks}, '
                f'algorithm={self.algorithm}, reward={self.reward}')


class TaskRouter(Router):
    """Per-task routing: a table of policy logits per task and layer (uniform at the start)."""

    def __init__(self, num_layers: int, num_templates: int, num_tasks: int = 1, device=None, dtype=None, **kwargs):
        super().__init__(num_layers, num_templates, num_tasks, device=device, dtype=dtype, **kwargs)
        self.logits = nn.Parameter(torch.zeros(self.num_tasks, num_layers, num_templates, device=device, dtype=dtype))
        self.reset_parameters()

    def policy_logits(self, l: int, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return self.logits[task, l]

    def policy(self) -> torch.Tensor:
        """The route probabilities (T, L, K) of every task."""
        return self.logits.detach().float().softmax(-1)


class InputRouter(Router):
    """Per-input routing: per layer, an MLP on the layer's pooled input and a task embedding."""

    def __init__(self, num_layers: int, num_templates: int, num_tasks: int = 1, channels: int = 64,
                 hidden: int = 32, embed: int = 8, device=None, dtype=None, **kwargs):
        super().__init__(num_layers, num_templates, num_tasks, device=device, dtype=dtype, **kwargs)
        dd = dict(device=device, dtype=dtype)
        self.task_embed = nn.Embedding(self.num_tasks, embed, **dd)
        self.nets = nn.ModuleList([nn.Sequential(
            nn.Linear(channels + embed, hidden, **dd), nn.ReLU(inplace=True), nn.Linear(hidden, num_templates, **dd))
            for _ in range(num_layers)])
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The last layer of each net starts at zero: a uniform policy, as the tabular routers."""
        super().reset_parameters()
        if not hasattr(self, 'nets') or self.task_embed.weight.device.type == 'meta':
            return
        nn.init.normal_(self.task_embed.weight, std=1.)
        for net in self.nets:
            nn.init.zeros_(net[2].weight)
            nn.init.zeros_(net[2].bias)

    def policy_logits(self, l: int, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        # the router reads the trunk's activations but does not shape them (detached, as the reference code)
        pooled = x.detach().mean((2, 3))
        return self.nets[l](torch.cat([pooled, self.task_embed(task).to(pooled.dtype)], 1))


_ROUTER_ARGS = ('reward', 'cost', 'collab', 'tau', 'tau_end', 'draw', 'hidden', 'embed')


def build_router(
        routing: Optional[str],
        router: Optional[str],
        num_layers: int,
        num_templates: int,
        channels: int,
        num_tasks: int = 1,
        order: Any = None,
        router_args: Optional[Dict[str, Any]] = None,
        device=None,
        dtype=None,
) -> Optional[Router]:
    """The router that model kwargs `routing`, `router`, `num_tasks`, `router_args` describe (None: mixtures)."""
    router_args = dict(router_args or {})
    if routing is None:
        if router is not None or router_args:
            raise ValueError(f'router={router!r} / router_args given without routing; set routing to one of {ROUTINGS}')
        return None
    if routing not in ROUTINGS:
        raise ValueError(f'unknown routing mode {routing!r}; expected one of {ROUTINGS} (or None for mixtures)')
    router = router or 'reinforce'
    if router not in ROUTERS:
        raise ValueError(f'unknown router {router!r}; expected one of {ROUTERS}')
    if order is not None:
        raise ValueError(f'routing={routing!r} cannot run on a hard order: the router chooses the templates '
                         f'(give no `order`)')
    unknown = sorted(set(router_args) - set(_ROUTER_ARGS))
    if unknown:
        raise ValueError(f'unknown router_args {unknown}; known: {list(_ROUTER_ARGS)}')
    net = {k: router_args.pop(k) for k in ('hidden', 'embed') if k in router_args}
    if routing == 'task':
        if net:
            raise ValueError(f'router_args {sorted(net)} size the per-input router\'s net; routing=\'task\' has none')
        return TaskRouter(num_layers, num_templates, num_tasks, algorithm=router, device=device, dtype=dtype,
                          **router_args)
    if router_args.get('draw', 'example') != 'example':
        raise ValueError('a per-input router draws a route per example; draw=\'task\' is for routing=\'task\'')
    return InputRouter(num_layers, num_templates, num_tasks, channels=channels, algorithm=router, device=device,
                       dtype=dtype, **net, **router_args)


def routing_loss(routers: List[Router], output: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
    """The routers' loss for the last forward (Routing Networks): each example's reward comes from its own
    cross-entropy and correctness (soft, mixup targets: their expected cross-entropy and argmax class)."""
    if not routers:
        return None
    output = output.float()
    if target.dim() == output.dim():  # soft targets
        per_example = -(target * output.log_softmax(-1)).sum(-1)
        correct = output.argmax(-1) == target.argmax(-1)
    else:
        per_example = F.cross_entropy(output, target, reduction='none')
        correct = output.argmax(-1) == target
    return sum(r.loss(per_example, correct) for r in routers)
