"""HalfCheetahVel and HalfCheetahDir (the MAML paper's locomotion tasks) on gymnasium's HalfCheetah-v5, MuJoCo physics,
batched over tasks x trajectories.

The reward follows tristandeleu/pytorch-maml-rl at 21d4ba1 (maml_rl/envs/mujoco/half_cheetah.py, itself adapted from
cbfinn/maml_rl's rllab/envs/mujoco/half_cheetah_env_rand.py and half_cheetah_env_rand_direc.py):

- forward velocity v = (x_after - x_before) / dt, x = qpos[0] (the root slide joint), dt = frame_skip * timestep;
- control cost 0.5 * 1e-1 * sum(a^2) = 0.05 * |a|^2 on the action the simulator applies (clipped to [-1, 1]);
- HalfCheetahVel: reward = -|v - v_goal| - 0.05 |a|^2, v_goal ~ U[0, 2] per task;
- HalfCheetahDir: reward = d * v - 0.05 |a|^2, d = +1 (forward) or -1 (backward), each with probability 1/2;
- no termination: every episode runs the horizon (paper 5.3 and cbfinn's scripts: H = 200).

The physics is gymnasium's HalfCheetah-v5 as `gymnasium.make("HalfCheetah-v5")` builds it: its MuJoCo model
(assets/half_cheetah.xml, timestep 0.01), frame_skip 5 (dt 0.05), its initial state init_qpos / init_qvel and its
reset noise (qpos + U[-0.1, 0.1], qvel + 0.1 N(0, 1), reset_noise_scale 0.1), and its default observation: qpos
without the x position, then qvel (17 values). One `mujoco.MjData` per episode is stepped exactly as v5's `step`
steps it (ctrl <- action, `mj_step(nstep=frame_skip)`; v5's `mj_rnePostConstraint` only fills contact forces that
nothing here reads), so an episode equals the gymnasium environment's from the same state (tested). Rewards,
observations and clipping are numpy over the whole batch; only the MuJoCo step is per episode (it is C; a 5-substep
step costs about 0.1 ms, the Python around it a few microseconds).

Where this differs from the environments the paper used (cbfinn/maml_rl: rllab + mujoco-py 0.x; pytorch-maml-rl:
gym's HalfCheetahEnv of the v2 era on mujoco-py), see docs/results/halfcheetah/README.md: mainly the observation
(both references append the torso position, x included, to qpos[1:] and qvel: 20 values; v5 excludes x: 17), the
velocity (cbfinn: the torso's centre-of-mass velocity; pytorch-maml-rl and here: the root's x displacement / dt),
the reset noise (rllab: qpos + 0.01 N(0, 1), qvel + 0.1 N(0, 1)), pytorch-maml-rl's action scaling (policy output
in [-10, 10] mapped to [-1, 1]; here, as cbfinn, the policy acts in the simulator's [-1, 1] units) and its horizon
(its configs: 100 steps; the paper: 200).

All randomness (task draws, reset noise) comes from a torch.Generator, so a round is a function of the generator
state, and a training run that saves the generator resumes exactly.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

INSTALL_HINT = ("the half-cheetah environments need the `mujoco` and `gymnasium[mujoco]` wheels (pinned in "
                "requirements.txt): .venv/bin/pip install -r requirements.txt (no GL or display is needed for physics)")
GYM_ID = "HalfCheetah-v5"
CTRL_COST = 0.5 * 1e-1  # pytorch-maml-rl / cbfinn: 0.5 * 1e-1 * sum(a^2) (v5's own default: 0.1 * sum(a^2))
# MuJoCo >= 3.3 warns while compiling gymnasium's half_cheetah.xml (`<compiler settotalmass>` is deprecated) and, with
# no handler installed, also appends the warning to MUJOCO_LOG.TXT in the working directory: caught while loading.
_KNOWN_WARNING = "settotalmass"


def _import_physics():
    try:
        import gymnasium
        import mujoco
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return gymnasium, mujoco


def load_halfcheetah_v5():
    """(gymnasium HalfCheetah-v5 environment, unwrapped): the model, init state and frame skip come from it."""
    gymnasium, mujoco = _import_physics()
    caught: list[str] = []
    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(caught.append)
    try:
        env = gymnasium.make(GYM_ID).unwrapped
    except Exception as exc:
        raise RuntimeError(f"gymnasium.make({GYM_ID!r}) failed: {exc}. {INSTALL_HINT}") from exc
    finally:
        mujoco.set_mju_user_warning(previous)
    for message in caught:
        if _KNOWN_WARNING not in message:
            warnings.warn(f"MuJoCo while loading {GYM_ID}: {message}", RuntimeWarning, stacklevel=2)
    return env


class HalfCheetahBatch:
    """All T x B episodes of one sampling round: `reset(tasks, B, generator)` then `step(actions)` `horizon` times.

    tasks [T, 1] float64: a goal velocity (HalfCheetahVel) or a direction +-1 (HalfCheetahDir). Observations [T, B, 17]
    float32; actions [T, B, 6], clipped here to [-1, 1] before they reach the simulator and the control cost.
    """

    obs_dim = 17
    act_dim = 6
    action_low, action_high = -1.0, 1.0
    reset_uses_generator = True  # reset() draws the initial-state noise from the sampler's generator

    def __init__(self, task: str = "velocity", horizon: int = 200, low: float = 0.0, high: float = 2.0,
                 ctrl_cost: float = CTRL_COST, reset_noise_scale: float | None = None):
        if task not in ("velocity", "direction"):
            raise ValueError(f"halfcheetah: task {task!r}, expected 'velocity' or 'direction'")
        if horizon < 1:
            raise ValueError(f"halfcheetah: horizon={horizon}, expected >= 1")
        if task == "velocity" and not low <= high:
            raise ValueError(f"halfcheetah-vel: goal velocity range [{low}, {high}], expected low <= high")
        self.task, self.horizon, self.low, self.high, self.ctrl_cost = task, horizon, low, high, ctrl_cost
        self.name = "halfcheetah-vel" if task == "velocity" else "halfcheetah-dir"
        _, self._mujoco = _import_physics()
        self._gym_env = load_halfcheetah_v5()  # kept: it owns the model
        self.model = self._gym_env.model
        self.frame_skip = int(self._gym_env.frame_skip)
        self.dt = float(self._gym_env.dt)  # frame_skip * model.opt.timestep = 0.05
        self.init_qpos = np.array(self._gym_env.init_qpos, dtype=np.float64)
        self.init_qvel = np.array(self._gym_env.init_qvel, dtype=np.float64)
        self.reset_noise_scale = (float(self._gym_env._reset_noise_scale) if reset_noise_scale is None
                                  else float(reset_noise_scale))
        self.nq, self.nv, self.nu = self.model.nq, self.model.nv, self.model.nu
        if (self.nq - 1 + self.nv, self.nu) != (self.obs_dim, self.act_dim):
            raise RuntimeError(f"{GYM_ID}: nq={self.nq}, nv={self.nv}, nu={self.nu}, expected an observation of "
                               f"{self.obs_dim} and {self.act_dim} actions")
        ctrl = np.asarray(self.model.actuator_ctrlrange)
        if not (np.all(ctrl[:, 0] == self.action_low) and np.all(ctrl[:, 1] == self.action_high)):
            raise RuntimeError(f"{GYM_ID}: actuator ctrlrange {ctrl.tolist()}, expected [-1, 1] for every actuator")
        self._pool: list = []  # MjData, reused across rounds (each reset starts from mj_resetData)
        self._goals = self.qpos = self.qvel = None

    # ---- tasks ----
    def sample_tasks(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n tasks [n, 1] float64: velocities ~ U[low, high], or directions 2 * Bernoulli(0.5) - 1."""
        if self.task == "velocity":
            return self.low + (self.high - self.low) * torch.rand(n, 1, generator=generator, dtype=torch.float64)
        return (2 * torch.randint(0, 2, (n, 1), generator=generator) - 1).to(torch.float64)

    # ---- episodes ----
    def _check_tasks(self, tasks: torch.Tensor):
        if tasks.dim() != 2 or tasks.shape[1] != 1:
            raise ValueError(f"{self.name}: tasks have shape {list(tasks.shape)}, expected [T, 1] "
                             f"({'goal velocities' if self.task == 'velocity' else 'directions +-1'})")
        if self.task == "direction" and not torch.all(tasks.abs() == 1):
            raise ValueError(f"{self.name}: directions {tasks.flatten().tolist()}, expected +1 or -1")

    def reset(self, tasks: torch.Tensor, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Start B episodes per task from v5's initial state plus its reset noise: observations [T, B, 17]."""
        self._check_tasks(tasks)
        n_tasks, s = tasks.shape[0], self.reset_noise_scale
        pos_noise = torch.rand(n_tasks, batch, self.nq, generator=generator, dtype=torch.float64) * (2 * s) - s
        vel_noise = s * torch.randn(n_tasks, batch, self.nv, generator=generator, dtype=torch.float64)
        return self.reset_to(tasks, self.init_qpos + pos_noise.numpy(), self.init_qvel + vel_noise.numpy())

    def reset_to(self, tasks: torch.Tensor, qpos: np.ndarray, qvel: np.ndarray) -> torch.Tensor:
        """Start episodes from given states qpos [T, B, nq], qvel [T, B, nv] (v5's `set_state`)."""
        self._check_tasks(tasks)
        qpos, qvel = np.asarray(qpos, dtype=np.float64), np.asarray(qvel, dtype=np.float64)
        if qpos.ndim != 3 or qpos.shape[0] != tasks.shape[0] or qpos.shape[2] != self.nq \
                or qvel.shape != qpos.shape[:2] + (self.nv,):
            raise ValueError(f"{self.name}: states qpos {list(qpos.shape)}, qvel {list(qvel.shape)}, expected "
                             f"[{tasks.shape[0]}, B, {self.nq}] and [{tasks.shape[0]}, B, {self.nv}]")
        mj = self._mujoco
        n = qpos.shape[0] * qpos.shape[1]
        while len(self._pool) < n:
            self._pool.append(mj.MjData(self.model))
        self._data = self._pool[:n]
        for d, p, v in zip(self._data, qpos.reshape(n, -1), qvel.reshape(n, -1)):
            mj.mj_resetData(self.model, d)
            d.qpos[:] = p
            d.qvel[:] = v
            mj.mj_forward(self.model, d)
        self._goals = tasks.to(torch.float64).numpy()  # [T, 1]: broadcasts over B
        self.qpos, self.qvel = qpos.copy(), qvel.copy()
        return self._observation()

    def _observation(self) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([self.qpos[..., 1:], self.qvel], axis=-1).astype(np.float32))

    def rewards(self, x_before: np.ndarray, x_after: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """The task rewards [T, B] for x positions before / after a step [T, B] and the applied actions [T, B, 6]."""
        velocity = (x_after - x_before) / self.dt
        forward = -np.abs(velocity - self._goals) if self.task == "velocity" else self._goals * velocity
        return forward - self.ctrl_cost * np.sum(np.square(actions), axis=-1)

    def step(self, actions: torch.Tensor):
        """actions [T, B, 6] (unclipped) -> (observations [T, B, 17], rewards [T, B], done [T, B] all False)."""
        if self.qpos is None:
            raise RuntimeError(f"{self.name}: step() before reset()")
        if tuple(actions.shape) != self.qpos.shape[:2] + (self.act_dim,):
            raise ValueError(f"{self.name}: actions have shape {list(actions.shape)}, expected "
                             f"{list(self.qpos.shape[:2]) + [self.act_dim]} ([T, B, {self.act_dim}])")
        applied = np.clip(actions.detach().to(torch.float64).numpy(), self.action_low, self.action_high)
        mj, model, skip = self._mujoco, self.model, self.frame_skip
        x_before = self.qpos[..., 0].copy()
        qpos, qvel = self.qpos.reshape(-1, self.nq), self.qvel.reshape(-1, self.nv)
        for i, (d, a) in enumerate(zip(self._data, applied.reshape(-1, self.act_dim))):
            d.ctrl[:] = a
            mj.mj_step(model, d, nstep=skip)
            qpos[i] = d.qpos
            qvel[i] = d.qvel
        reward = self.rewards(x_before, self.qpos[..., 0], applied)
        done = torch.zeros(reward.shape, dtype=torch.bool)
        return self._observation(), torch.from_numpy(reward.astype(np.float32)), done


def HalfCheetahVel(horizon: int = 200, low: float = 0.0, high: float = 2.0) -> HalfCheetahBatch:
    return HalfCheetahBatch("velocity", horizon, low, high)


def HalfCheetahDir(horizon: int = 200) -> HalfCheetahBatch:
    return HalfCheetahBatch("direction", horizon)
