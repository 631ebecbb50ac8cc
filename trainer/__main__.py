"""`python -m trainer CONFIG [--resume] [--zoo models/zoo/NAME.pt] [--key value ...]`: train, then meta-test."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from models.checkpoint import load_checkpoint, save_checkpoint
from models.functional import adapted_keys
from models.runtime import tune_cpu_allocator
from trainer.config import config_from_args
from trainer.evaluate import evaluate, results_markdown
from trainer.plots import plot_steps, plot_training
from trainer.rl.config import RL_CONFIGS
from trainer.stop import stop_on_signals
from trainer.train import Trainer, leave_process_group


def adapt_keys_of(model) -> tuple[str, ...] | None:
    """The parameters a checkpoint's recipe adapts (None: all of them, the MAML default)."""
    return None if model.spec.adapt_params == "all" else adapted_keys(model.spec, model.spec.adapt_params)


def final_evaluation(trainer: Trainer) -> dict:
    """Meta-test the best checkpoint (validation) or the last one, write JSON/markdown/PNG, record in provenance."""
    cfg, run = trainer.cfg, trainer.dir
    path = run / "best.pt" if (run / "best.pt").exists() else run / "last.pt"
    model = load_checkpoint(path, device=trainer.device)
    result = evaluate(model.spec, model.params, trainer.samplers["test"](), cfg.eval_tasks, cfg.eval_steps,
                      model.inner_lr(), cfg.eval_chunk, adapt_keys=adapt_keys_of(model), step_lrs=model.step_lrs,
                      bn_running=model.bn_running, step_bn=model.step_bn)
    result.update({"checkpoint": path.name, "iterations": model.provenance.get("iterations"),
                   "train_seconds": model.provenance.get("train_seconds"), "device": model.provenance.get("device"),
                   "split": cfg.split, "report_step": cfg.test_steps})
    (run / "results.json").write_text(json.dumps(result, indent=1))
    (run / "results.md").write_text(results_markdown(cfg.name, result))
    plot_steps(result, f"{cfg.name} meta-test", run / "meta_test_steps.png")
    if (run / "log.jsonl").exists():
        plot_training(run / "log.jsonl", f"{cfg.name} training", run / "training.png")
    model.provenance["meta_test"] = {k: v for k, v in result.items() if k in ("tasks", "metric", "transductive",
                                                                                 "support", "running", "report_step")}
    save_checkpoint(path, model)
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in RL_CONFIGS:  # MAML-RL (policies): its own config, loop and results
        from trainer.rl.main import main as rl_main

        return rl_main(argv)
    cfg, args = config_from_args(argv)
    tune_cpu_allocator()  # CPU training allocates the same activation sizes every iteration
    trainer = Trainer(cfg, resume=args.resume)
    # ranks would stop at different iterations: torchrun runs keep the default handlers
    where = f"at the next log point (iteration multiple of {cfg.log_every}), then saving and evaluating"
    with stop_on_signals(trainer, where, enabled=trainer.world == 1):
        trainer.train()
    leave_process_group()  # rank 0 evaluates and bundles alone below
    if trainer.rank != 0:
        return 0
    if cfg.final_eval:
        result = final_evaluation(trainer)
        print(results_markdown(cfg.name, result))
    if args.zoo:
        best = trainer.dir / "best.pt" if (trainer.dir / "best.pt").exists() else trainer.dir / "last.pt"
        Path(args.zoo).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, args.zoo)
        print(f"bundled {best} -> {args.zoo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
