"""The tasks a topology search is scored on, each evaluating a whole population at every
shared weight value at once.

- classification (``xor``, ``mnist1d``, ``fashion_mnist``): accuracy; the behaviour is the
  predicted class of a fixed probe set;
- ``swingup``: the cart-pole swing-up of Gaier & Ha's benchmark (WANNRelease
  ``cartpole_swingup.py``: masses 0.5/0.5, pole 0.6, friction 0.1, force 10, dt 0.01,
  track +-2.4, reward (cos(theta)+1)/2 * cos(x/2.4 * pi/2), start hanging down with
  N(0, 0.2) noise), a fixed episode length; the behaviour is the final cart position and
  pole direction;
- ``maze``: Lehman & Stanley's medium maze (walls, start (30, 22), goal (270, 100), 400
  steps; six rangefinders of range 100 at -90, -45, 0, 45, 90, 180 degrees and four
  90-degree radar slices towards the goal; a robot of radius 5 that does not move into a
  wall); the performance is 300 - distance to the goal at the end, the behaviour the end
  point, solved when it ends within 5 units of the goal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .graph import Genome, compile_population, forward


@dataclass
class Evaluation:
    performance: np.ndarray  # (P, W)
    behaviour: np.ndarray  # (P, W, D)
    solved: np.ndarray | None = None  # (P, W) bool, maze only
    endpoints: np.ndarray | None = None  # (P, W, 2), maze only
    fitness: np.ndarray | None = None  # (P, W) what selection maximises; None: performance

    def __post_init__(self):
        if self.fitness is None:
            self.fitness = self.performance


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))


# classification -------------------------------------------------------------------


class Classification:
    """Accuracy of the arg-max output on a batch of training examples (a new batch each
    generation, drawn from the run's seed); test accuracy after the search. Selection
    maximises the negative cross-entropy of the softmax outputs on that batch, as the
    reference's ``classify_gym`` rewards (``fitness="cross_entropy"``), or the accuracy."""

    out_act = "linear"
    can_train = True

    def __init__(
        self,
        data,
        eval_examples: int,
        probe_examples: int,
        image_size: int | None,
        fitness: str = "accuracy",
    ):
        def flat(x):
            if x.dim() == 4 and image_size and x.shape[-1] != image_size:
                x = F.interpolate(x, size=(image_size, image_size), mode="area")
            return x.reshape(len(x), -1).float()

        self.name, self.fitness = data.name, fitness
        self.x_train, self.y_train = flat(data.x_train), data.y_train
        self.x_test, self.y_test = flat(data.x_test), data.y_test
        self.n_in, self.n_out = self.x_train.shape[1], data.num_classes
        self.eval_examples = min(eval_examples, len(self.y_train))
        self.probe = self.x_train[: min(probe_examples, len(self.y_train))]

    def _batch(self, seed: int):
        idx = torch.randperm(len(self.y_train), generator=_generator(seed))[: self.eval_examples]
        return self.x_train[idx], self.y_train[idx]

    @staticmethod
    def _outputs(genomes, x, weights=None, edge_weights=None, chunk: int = 32):
        outs = []
        for i in range(0, len(genomes), chunk):
            net = compile_population(genomes[i : i + chunk], shared_inputs=True)
            outs.append(forward(net, x, weights=weights, edge_weights=edge_weights))
        return torch.cat(outs, dim=1)  # (W, P, B, C)

    @torch.no_grad()
    def evaluate(self, genomes: list[Genome], weights, seed: int) -> Evaluation:
        x, y = self._batch(seed)
        w = torch.as_tensor(weights, dtype=torch.float32)
        out = self._outputs(genomes, x, weights=w)
        acc = (out.argmax(-1) == y).float().mean(-1).T  # (P, W)
        fit = acc
        if self.fitness == "cross_entropy":
            logp = torch.nan_to_num(out, nan=0.0).log_softmax(-1)
            nll = -logp.gather(-1, y.expand(*out.shape[:-1]).unsqueeze(-1)).squeeze(-1)
            fit = -torch.nan_to_num(nll.mean(-1), nan=1e9, posinf=1e9).T
        probe = self._outputs(genomes, self.probe, weights=w).argmax(-1)  # (W, P, K)
        onehot = F.one_hot(probe, self.n_out).float().permute(1, 0, 2, 3)
        b = onehot.reshape(len(genomes), len(w), -1).numpy()
        return Evaluation(acc.numpy(), b, fitness=fit.numpy())

    @torch.no_grad()
    def score(self, genome: Genome, weights, split: str = "test", ensemble: bool = False):
        """Accuracy at each shared weight (or of the weights' averaged softmax)."""
        x, y = (self.x_test, self.y_test) if split == "test" else self._batch(0)
        w = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        acc, prob = [], 0
        for i in range(0, len(w), 4):  # a few weight values at a time: memory
            out = self._outputs([genome], x, weights=w[i : i + 4])[:, 0]  # (w, B, C)
            acc.append((out.argmax(-1) == y).float().mean(-1))
            prob = prob + out.softmax(-1).sum(0)
        if ensemble:
            return float((prob.argmax(-1) == y).float().mean())
        return torch.cat(acc).numpy()

    @torch.no_grad()
    def score_edges(self, genome: Genome, edge_weights: torch.Tensor) -> np.ndarray:
        out = self._outputs([genome], self.x_test, edge_weights=edge_weights.float())[:, 0]
        return (out.argmax(-1) == self.y_test).float().mean(-1).numpy()

    def train_weights(self, genome, init: torch.Tensor, steps: int, lr: float, seed: int):
        """Individual connection weights trained by Adam on the cross-entropy."""
        w = init.clone().float().reshape(1, -1).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        net = compile_population([genome], shared_inputs=True)
        gen = _generator(seed)
        for _ in range(steps):
            idx = torch.randint(len(self.y_train), (128,), generator=gen)
            out = forward(net, self.x_train[idx], edge_weights=w)[0, 0]
            loss = F.cross_entropy(out, self.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return w.detach()


# cart-pole swing-up ----------------------------------------------------------------

SWINGUP = dict(g=9.82, m_c=0.5, m_p=0.5, l=0.6, force=10.0, dt=0.01, b=0.1, x_limit=2.4)


def swingup_step(state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """One step of the reference's dynamics: ``state`` (..., 4) = x, x_dot, theta,
    theta_dot (theta 0 upright); ``action`` in [-1, 1] scales the force. Positions move with
    the old velocities, then the velocities are updated (the reference's order)."""
    p = SWINGUP
    x, x_dot, theta, theta_dot = state.unbind(-1)
    f = action.clamp(-1, 1) * p["force"]
    s, c = torch.sin(theta), torch.cos(theta)
    m_t, m_p, l_ = p["m_c"] + p["m_p"], p["m_p"], p["l"]
    x_acc = (
        -2 * m_p * l_ * theta_dot**2 * s + 3 * m_p * p["g"] * s * c + 4 * f - 4 * p["b"] * x_dot
    ) / (4 * m_t - 3 * m_p * c**2)
    th_acc = (
        -3 * m_p * l_ * theta_dot**2 * s * c + 6 * m_t * p["g"] * s + 6 * (f - p["b"] * x_dot) * c
    ) / (4 * l_ * m_t - 3 * m_p * l_ * c**2)
    dt = p["dt"]
    return torch.stack(
        [x + x_dot * dt, x_dot + x_acc * dt, theta + theta_dot * dt, theta_dot + th_acc * dt], -1
    )


def swingup_reward(state: torch.Tensor) -> torch.Tensor:
    x, theta = state[..., 0], state[..., 2]
    return (torch.cos(theta) + 1) / 2 * torch.cos(x / SWINGUP["x_limit"] * math.pi / 2)


def swingup_observation(state: torch.Tensor) -> torch.Tensor:
    x, x_dot, theta, theta_dot = state.unbind(-1)
    return torch.stack([x, x_dot, torch.cos(theta), torch.sin(theta), theta_dot], -1)


def swingup_starts(n: int, seed: int) -> torch.Tensor:
    mean = torch.tensor([0.0, 0.0, math.pi, 0.0], dtype=torch.float64)
    return mean + 0.2 * torch.randn(n, 4, generator=_generator(seed), dtype=torch.float64)


class SwingUp:
    """Total reward of an episode of ``steps`` steps (ended early when the cart leaves the
    track), averaged over ``trials`` start states shared by the whole population."""

    n_in, n_out, out_act, name = 5, 1, "tanh", "swingup"
    can_train = True

    def __init__(self, steps: int, trials: int, test_trials: int):
        self.steps, self.trials, self.test_trials = steps, trials, test_trials

    def rollout(self, policy, starts: torch.Tensor, lead: tuple[int, ...]):
        """Run ``policy(obs (*lead, T, 5)) -> (*lead, T)`` from ``starts`` (T, 4); returns
        the total rewards and the final states, (*lead, T) and (*lead, T, 4)."""
        state = starts.expand(*lead, *starts.shape).clone()
        total = state.new_zeros(state.shape[:-1])
        alive = torch.ones_like(total)
        for _ in range(self.steps):
            action = policy(swingup_observation(state))
            state = swingup_step(state, action)
            total = total + alive * swingup_reward(state)
            alive = alive * (state[..., 0].abs() <= SWINGUP["x_limit"]).to(state.dtype)
        return total, state

    def _policy(self, genomes, weights=None, edge_weights=None):
        net = compile_population(genomes, shared_inputs=False)

        def policy(obs):  # (W, P, T, 5) -> (W, P, T)
            return forward(net, obs, weights=weights, edge_weights=edge_weights)[..., 0]

        return policy

    @torch.no_grad()
    def evaluate(self, genomes, weights, seed: int) -> Evaluation:
        w = torch.as_tensor(weights, dtype=torch.float64)
        starts = swingup_starts(self.trials, seed)
        total, final = self.rollout(
            self._policy(genomes, weights=w), starts, (len(w), len(genomes))
        )
        behaviour = swingup_observation(final)[..., [0, 2, 3]]  # x, cos, sin per trial
        perf = total.mean(-1).T.numpy()
        b = behaviour.permute(1, 0, 2, 3).reshape(len(genomes), len(w), -1)
        return Evaluation(perf, b.numpy())

    def _test_starts(self):
        return swingup_starts(self.test_trials, -1)

    @torch.no_grad()
    def score(self, genome, weights, split: str = "test", ensemble: bool = False):
        w = torch.as_tensor(weights, dtype=torch.float64)
        starts = self._test_starts() if split == "test" else swingup_starts(self.trials, 0)
        total, _ = self.rollout(self._policy([genome], weights=w), starts, (len(w), 1))
        return total.mean(-1)[:, 0].numpy()

    @torch.no_grad()
    def score_edges(self, genome, edge_weights):
        ew = edge_weights.to(torch.float64)
        total, _ = self.rollout(
            self._policy([genome], edge_weights=ew), self._test_starts(), (len(ew), 1)
        )
        return total.mean(-1)[:, 0].numpy()

    def train_weights(self, genome, init: torch.Tensor, steps: int, lr: float, seed: int):
        """Individual weights trained by Adam on the episode reward, back-propagated through
        the simulator (it is differentiable), over 8 random starts per update."""
        w = init.clone().to(torch.float64).reshape(1, -1).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        for i in range(steps):
            starts = swingup_starts(8, seed + i)
            total, _ = self.rollout(self._policy([genome], edge_weights=w), starts, (1, 1))
            loss = -total.mean() / self.steps
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([w], 1.0)
            opt.step()
        return w.detach()


# maze navigation --------------------------------------------------------------------

MEDIUM_WALLS = (
    ((5, 5), (295, 5)),
    ((295, 5), (295, 135)),
    ((295, 135), (5, 135)),
    ((5, 135), (5, 5)),
    ((241, 135), (58, 65)),
    ((114, 5), (73, 42)),
    ((130, 91), (107, 46)),
    ((196, 5), (139, 51)),
    ((219, 125), (182, 63)),
    ((267, 5), (214, 63)),
    ((271, 135), (237, 88)),
)
MAZE = dict(
    start=(30.0, 22.0),
    heading=0.0,
    goal=(270.0, 100.0),
    radius=5.0,
    range=100.0,
    max_speed=3.0,
    goal_radius=5.0,
    fitness_base=300.0,
)
RANGEFINDER_ANGLES = (-90.0, -45.0, 0.0, 45.0, 90.0, 180.0)
RADAR_SLICES = (315.0, 45.0, 135.0, 225.0)  # front, left, back, right: [lo, lo + 90)


def _walls(walls=MEDIUM_WALLS) -> torch.Tensor:
    return torch.tensor([[*p, *q] for p, q in walls], dtype=torch.float64)  # (S, 4)


def wall_distance(points: torch.Tensor, walls: torch.Tensor | None = None) -> torch.Tensor:
    """(N, S) distances from points (N, 2) to wall segments (S, 4)."""
    walls = _walls() if walls is None else walls
    p, q = walls[:, :2], walls[:, 2:]
    d = q - p
    t = (((points[:, None, :] - p) * d).sum(-1) / (d * d).sum(-1)).clamp(0, 1)
    nearest = p + t[..., None] * d
    return (points[:, None, :] - nearest).norm(dim=-1)


def collides(points: torch.Tensor, walls: torch.Tensor | None = None) -> torch.Tensor:
    """Whether a robot of radius 5 at each point touches a wall."""
    return (wall_distance(points, walls) < MAZE["radius"]).any(-1)


def rangefinders(loc: torch.Tensor, heading: torch.Tensor, walls=None) -> torch.Tensor:
    """(N, 6) distance along each rangefinder (heading + angle, in degrees) to the nearest
    wall, at most the range 100."""
    walls = _walls() if walls is None else walls
    ang = torch.deg2rad(heading[:, None] + torch.tensor(RANGEFINDER_ANGLES, dtype=loc.dtype))
    r = torch.stack([torch.cos(ang), torch.sin(ang)], -1)  # (N, 6, 2)
    p, s = walls[:, :2], walls[:, 2:] - walls[:, :2]  # (S, 2)
    # loc + t r = p + u s  ->  t = cross(p - loc, s) / cross(r, s), u = cross(p - loc, r) / ..
    qp = p[None, None] - loc[:, None, None, :]  # (N, 1, S, 2)
    rr = r[:, :, None, :]  # (N, 6, 1, 2)

    def cross(a, b):
        return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]

    den = cross(rr, s[None, None])
    t = cross(qp, s[None, None]) / den
    u = cross(qp, rr) / den
    hit = (den.abs() > 1e-12) & (t >= 0) & (u >= 0) & (u <= 1)
    t = torch.where(hit, t, torch.full_like(t, math.inf))
    return t.min(-1).values.clamp(max=MAZE["range"])


def radar(loc: torch.Tensor, heading: torch.Tensor, goal=MAZE["goal"]) -> torch.Tensor:
    """(N, 4) one-hot pie slice (front, left, back, right) that holds the goal."""
    g = torch.tensor(goal, dtype=loc.dtype)
    ang = torch.rad2deg(torch.atan2(g[1] - loc[:, 1], g[0] - loc[:, 0]))
    rel = (ang - heading) % 360
    lo = torch.tensor(RADAR_SLICES, dtype=loc.dtype)
    off = (rel[:, None] - lo) % 360
    return (off < 90).to(loc.dtype)


def maze_sensors(loc, heading):
    """The network's inputs: rangefinders scaled to [0, 1] by the range, then the radar."""
    return torch.cat([rangefinders(loc, heading) / MAZE["range"], radar(loc, heading)], -1)


def maze_step(loc, heading, speed, turn, action):
    """Outputs in [0, 1] change the turning rate and speed by ``output - 0.5`` (clipped to
    +-3); the robot turns, then moves unless the new place touches a wall."""
    m = MAZE["max_speed"]
    turn = (turn + action[:, 0] - 0.5).clamp(-m, m)
    speed = (speed + action[:, 1] - 0.5).clamp(-m, m)
    heading = (heading + turn) % 360
    rad = torch.deg2rad(heading)
    new = loc + speed[:, None] * torch.stack([torch.cos(rad), torch.sin(rad)], -1)
    loc = torch.where(collides(new)[:, None], loc, new)
    return loc, heading, speed, turn


class Maze:
    n_in, n_out, out_act, name = 10, 2, "sigmoid", "maze"
    can_train = False

    def __init__(self, steps: int):
        self.steps = steps

    def run(self, genomes, weights=None, edge_weights=None):
        w_count = len(weights) if weights is not None else len(edge_weights)
        n = w_count * len(genomes)
        net = compile_population(genomes, shared_inputs=False)
        loc = torch.tensor(MAZE["start"], dtype=torch.float64).repeat(n, 1)
        heading = torch.full((n,), MAZE["heading"], dtype=torch.float64)
        speed, turn = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for _ in range(self.steps):
            obs = maze_sensors(loc, heading).reshape(w_count, len(genomes), 1, -1)
            out = forward(net, obs, weights=weights, edge_weights=edge_weights)
            loc, heading, speed, turn = maze_step(loc, heading, speed, turn, out.reshape(n, 2))
        return loc.reshape(w_count, len(genomes), 2).permute(1, 0, 2)  # (P, W, 2)

    def _measure(self, end):
        dist = (end - torch.tensor(MAZE["goal"], dtype=end.dtype)).norm(dim=-1)
        return (MAZE["fitness_base"] - dist).numpy(), (dist < MAZE["goal_radius"]).numpy()

    @torch.no_grad()
    def evaluate(self, genomes, weights, seed: int) -> Evaluation:
        end = self.run(genomes, weights=torch.as_tensor(weights, dtype=torch.float64))
        perf, solved = self._measure(end)
        return Evaluation(perf, end.numpy(), solved, end.numpy())

    @torch.no_grad()
    def score(self, genome, weights, split: str = "test", ensemble: bool = False):
        end = self.run([genome], weights=torch.as_tensor(weights, dtype=torch.float64))
        return self._measure(end)[0][0]

    @torch.no_grad()
    def score_edges(self, genome, edge_weights):
        return self._measure(self.run([genome], edge_weights=edge_weights.double()))[0][0]


TASKS = ("xor", "mnist1d", "fashion_mnist", "swingup", "maze")
CLASSIFICATION = ("xor", "mnist1d", "fashion_mnist")

__all__ = [
    "CLASSIFICATION",
    "Classification",
    "Evaluation",
    "MAZE",
    "MEDIUM_WALLS",
    "Maze",
    "SWINGUP",
    "SwingUp",
    "TASKS",
    "collides",
    "maze_sensors",
    "maze_step",
    "radar",
    "rangefinders",
    "swingup_reward",
    "swingup_step",
    "wall_distance",
]
