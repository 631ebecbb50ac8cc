"""Write the current parameters of a run's state.pt as a checkpoint (the last iterate), for trainer.evaluate."""
import sys

from models.checkpoint import save_checkpoint
from trainer.config import config_from_args
from trainer.train import Trainer

out = sys.argv[1]
cfg, _ = config_from_args(sys.argv[2:])
t = Trainer(cfg, resume=True)
save_checkpoint(out, t.meta_model(t.provenance(selected="last")))
print("wrote", out, "iteration", t.iteration)
