"""The fused Triton kernels of the MAML inner loop and their host launchers: the only sub-package that imports
triton at module level.

- `common`: batch-norm math as Triton device functions, host-side argument checks, the layout conventions;
- `conv_forward` / `conv_backward`: one conv block (conv + batch norm + ReLU + 2x2 max-pool), forward and the
  backward fused with the SGD update of its weights;
- `head`: the linear head, forward, loss, backward and update in one kernel;
- `stats`: batch-norm statistics between the kernels' fp64 sums and the (mean, variance) an adaptation keeps;
- `program`: `AdaptProgram`, a whole K-step adaptation (and predict) as a fixed sequence of launches. It plays the
  role an autograd Function plays elsewhere: the backward fuses the update, so it is not a differentiable op.
"""
