"""The inner step: vanilla policy gradient (REINFORCE with the linear feature baseline), all tasks at once.

Per task the surrogate is L(theta) = -mean over the steps taken of log pi_theta(a_t | s_t) * A_t, and the inner step
is one SGD step theta' = theta - alpha * grad L on every parameter, the log-std included. The implementation lives in
models.policy_adapt (`reinforce_loss`, `vpg_step`): the server adapts a policy with the same code.
"""

from __future__ import annotations

from models.policy_adapt import masked_task_mean, reinforce_loss, vpg_step

adapt = vpg_step  # the trainer's name for it: adapt(spec, params, traj, adv, lr, create_graph=False)

__all__ = ["adapt", "masked_task_mean", "reinforce_loss"]
