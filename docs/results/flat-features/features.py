"""A/B probe (docs/results/flat-features/README.md): the conv4-omniglot body with its last 2x2 feature map kept
(flattened, 4C features) instead of averaged (C features), without a new architecture in models/.

`python docs/results/flat-features/features.py MODE MODULE ARGS...` runs `python -m MODULE ARGS...` (trainer or
trainer.evaluate) with models.functional's omniglot feature step replaced: MODE `mean` is the shipped body
(the same operations), `flat` the flattened map scaled by 1/2 (so a squared distance keeps the mean's scale:
|flat|^2 / 4 = the mean of the four cells' squared norms). An experiment only: nothing serves such a model.
"""

import runpy
import sys

import models.functional as functional

if len(sys.argv) < 3:
    print("usage: features.py mean|flat MODULE [ARGS...]", file=sys.stderr)
    sys.exit(2)
MODE, MODULE = sys.argv[1], sys.argv[2]
if MODE not in ("mean", "flat"):
    print(f"features.py: mode {MODE!r}, expected mean or flat", file=sys.stderr)
    sys.exit(2)


def _features(spec, params, x, stat_rows, double_backward=False, given=None, record=None):
    if spec.arch != "conv4-omniglot" or MODE == "mean":
        return _shipped(spec, params, x, stat_rows, double_backward, given, record)
    tasks, batch = x.shape[:2]
    h = x.transpose(0, 1).reshape(batch, tasks * x.shape[2], *x.shape[3:])
    for i in range(4):
        h = functional._conv_bn_relu(
            h, params[f"conv{i}.weight"], params[f"conv{i}.bias"], params[f"bn{i}.weight"], params[f"bn{i}.bias"],
            2, stat_rows, double_backward, None if given is None else given[i], record,
        )
    return (0.5 * h.reshape(batch, tasks, -1)).transpose(0, 1)  # [T, B, 4C]


_shipped = functional._conv4_features
functional._conv4_features = _features
sys.argv = [MODULE] + sys.argv[3:]
runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
