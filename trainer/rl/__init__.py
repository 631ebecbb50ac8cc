"""MAML for reinforcement learning (Finn et al. 2017, section 5.3): batched environments, trajectory sampling, the
linear feature baseline, the VPG inner step and the TRPO meta-update, evaluation and the training entry point."""
