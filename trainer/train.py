"""The meta-training loop: data, meta-updates, validation, checkpoints, resume, final meta-test evaluation.

`python -m trainer CONFIG [--resume] [--key value ...]`; `torchrun --nproc_per_node N -m trainer ...` splits every
meta-batch across ranks and all-reduces the meta-gradient (each rank draws the same full meta-batch from the same
seeded sampler and keeps its slice, so N ranks make exactly the update one process makes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from models.checkpoint import MetaModel, save_checkpoint
from models.spec import ModelSpec
from trainer.config import TrainConfig
from trainer.evaluate import evaluate
from trainer.meta import MetaLearner

STATE_FILE = "state.pt"
TEST_SEED = 1_000_003  # meta-test tasks are the same for every model and run
VAL_SEED = 1_000_033


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_spec(cfg: TrainConfig) -> ModelSpec:
    return ModelSpec(name=cfg.name, arch=cfg.arch, ways=cfg.ways, inner_lr=cfg.inner_lr, steps=cfg.test_steps,
                     bn_policy=cfg.serve_bn_policy, hidden=cfg.hidden, adapt_params=cfg.adapt_params,
                     head_init=cfg.head_init, support_views=cfg.support_views)


def build_samplers(cfg: TrainConfig, device) -> tuple[dict, dict]:
    """Samplers for 'train', 'val' (or None) and 'test', and the split's provenance."""
    if cfg.dataset == "sinusoid":
        from trainer.data.sinusoid import SinusoidSampler

        return ({"train": SinusoidSampler(cfg.shots, cfg.queries, seed=cfg.seed, device=device),
                 "val": lambda: SinusoidSampler(cfg.shots, cfg.eval_queries, seed=VAL_SEED, device=device),
                 "test": lambda: SinusoidSampler(cfg.shots, cfg.eval_queries, seed=TEST_SEED, device=device)},
                {"dataset": "sinusoid"})
    task_kind: dict = {}  # the train sampler's task kind: --train_within_alphabet (labels, share), --rotation_classes,
    # --train_shift, --train_tilt / --train_scale
    if cfg.dataset == "omniglot":
        from trainer.data.omniglot import load_omniglot, omniglot_split, omniglot_split_alphabets, split_info
        from trainer.data.sampler import omniglot_sampler as make

        data = load_omniglot(cfg.data_root or None)
        splits = omniglot_split(data, cfg.split, seed=0, val_classes=cfg.val_classes)
        info = split_info(data, cfg.split, 0, cfg.val_classes)
        if cfg.rotation_classes:
            task_kind = {"rotation_classes": True}
        if cfg.train_within_alphabet > 0:
            task_kind = {"alphabets": omniglot_split_alphabets(data, cfg.split, 0, cfg.val_classes)["train"],
                      "within_alphabet": True, "within_fraction": cfg.train_within_alphabet}
        if cfg.train_shift:
            task_kind["shift"] = cfg.train_shift
        if cfg.train_tilt or cfg.train_scale:
            task_kind.update(tilt=cfg.train_tilt, scale=cfg.train_scale)
    elif cfg.dataset == "miniimagenet":
        from trainer.data.miniimagenet import load_miniimagenet
        from trainer.data.miniimagenet import miniimagenet_sampler as make

        root = cfg.data_root or os.environ.get("FASTADAPT_MINIIMAGENET", "")
        splits = {s: load_miniimagenet(root, s) for s in ("train", "val", "test")}
        info = {"dataset": "miniimagenet", "split": "ravi", "classes": {s: len(v) for s, v in splits.items()}}
    else:
        raise ValueError(f"dataset {cfg.dataset!r}, expected omniglot, miniimagenet or sinusoid")
    samplers = {
        "train": make(splits["train"], cfg.ways, cfg.shots, cfg.queries, rotate=cfg.rotate, seed=cfg.seed,
                      device=device, **task_kind),
        "val": (lambda: make(splits["val"], cfg.ways, cfg.shots, cfg.eval_queries, seed=VAL_SEED, device=device))
        if len(splits["val"]) >= cfg.ways else None,
        "test": lambda: make(splits["test"], cfg.ways, cfg.shots, cfg.eval_queries, seed=TEST_SEED, device=device),
    }
    return samplers, info


def git_commit() -> str:
    """The checkout's commit, or $FASTADAPT_COMMIT where the tree travelled without .git (a GPU box)."""
    if os.environ.get("FASTADAPT_COMMIT"):
        return os.environ["FASTADAPT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def leave_process_group() -> None:
    """All ranks meet, then tear the group down while the interpreter is whole.

    A rank that tears gloo down while its peer is still busy, or that leaves it to interpreter finalization, can
    make a rank abort with SIGABRT ("terminate called without an active exception") after its work is done.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_slice(batch, rank: int, world: int):
    """This rank's share of a full meta-batch (support_x, support_y, query_x, query_y)."""
    t = batch[0].shape[0]
    if t % world:
        raise ValueError(f"meta_batch {t} is not divisible by the {world} ranks")
    n = t // world
    return tuple(b[rank * n: (rank + 1) * n] for b in batch)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        self.stop_requested = False  # request_stop(): end at the next log point, as --max_seconds does
        self.rank, self.world = _dist_info()
        self.device = pick_device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", self.rank % torch.cuda.device_count())
        self.dir = Path(cfg.run_dir())
        self.spec = model_spec(cfg)
        if self.spec.uses_running_stats() and not cfg.bn_running:
            raise ValueError(f"serve_bn_policy 'running' for {cfg.name}: the checkpoints need running statistics, "
                             "expected bn_running=True")
        self.samplers, self.split_info = build_samplers(cfg, self.device)
        self.learner = MetaLearner(cfg, self.spec, self.device, torch.Generator().manual_seed(cfg.seed))
        self.init_info = None
        if cfg.init_from and not resume:
            self._init_from(cfg.init_from)
        self.iteration = 0
        self.best_val = -float("inf")
        self.train_seconds = 0.0
        if resume:
            self._load_state()

    def _init_from(self, path: str):
        """Start from another checkpoint's meta-initialization (same architecture and ways), e.g. a MAML body for
        ANIL; Adam starts fresh. Its file name and provenance summary go into this run's provenance. A run whose head
        starts at the support prototypes (head_init proto) never reads the meta-learned head, so it may start from a
        checkpoint of other ways: the body is copied and the head keeps its fresh initialization (higher-way
        training: a 40-way run from a 20-way model, served at 20-way by `models.variant --ways`)."""
        from models.checkpoint import load_checkpoint
        from models.functional import HEAD_KEYS

        source = load_checkpoint(path, expect_arch=self.spec.arch)
        other_ways = source.spec.ways != self.spec.ways
        if source.spec.hidden != self.spec.hidden or (other_ways and self.cfg.head_init != "proto"):
            raise ValueError(f"--init_from {path}: {source.spec.ways} ways / {source.spec.hidden} filters, expected "
                             f"{self.spec.ways} / {self.spec.hidden} for {self.cfg.name} (other ways only with "
                             "--head_init proto)")
        with torch.no_grad():
            for k, v in source.params.items():
                if not (other_ways and k in HEAD_KEYS):
                    self.learner.params[k].copy_(v)
        if self.learner.step_bn is not None:  # its per-step batch-norm weights, or its one gamma / beta for every step
            if source.step_bn is not None:
                self.learner.set_step_bn(source.step_bn)
            else:
                self.learner.reset_step_bn()
        prov = source.provenance
        self.init_info = {"path": str(path), "name": source.spec.name, "commit": prov.get("commit"),
                          "iterations": prov.get("iterations"), "algorithm": prov.get("config", {}).get("algorithm"),
                          "recipe": prov.get("config", {}).get("recipe", "maml"), "device": prov.get("device")}

    # ---- state ----
    def _state(self) -> dict:
        return {"iteration": self.iteration, "best_val": self.best_val, "train_seconds": self.train_seconds,
                "config": dataclasses.asdict(self.cfg), "learner": self.learner.state_dict(),
                "sampler": self.samplers["train"].state_dict(),
                **({"init_from": self.init_info} if self.init_info else {})}

    def _save_state(self):
        if self.rank:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (STATE_FILE + ".tmp")
        torch.save(self._state(), tmp)
        os.replace(tmp, self.dir / STATE_FILE)

    def _load_state(self):
        path = self.dir / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"--resume: no training state at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.iteration, self.best_val = state["iteration"], state["best_val"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.init_info = state.get("init_from")
        self.learner.load_state_dict(state["learner"])
        self.samplers["train"].load_state_dict(state["sampler"])
        if getattr(self.samplers["train"], "resumed_across_devices", False) and self.rank == 0:
            print(f"NOTICE: {path} was saved on another kind of device: parameters and Adam state continue exactly, "
                  "the task sampler is re-seeded (the run is no longer bit-for-bit the uninterrupted one)",
                  file=sys.stderr)

    def meta_model(self, provenance: dict | None = None) -> MetaModel:
        """The checkpoint of the current meta-initialization. With per-step batch-norm weights, `params`' own
        bn{i}.weight / bias are their last row (the learner keeps them so: MetaLearner.sync_bn_rows)."""
        lrs, step_lrs, running = self.learner.inner_lrs, self.learner.step_lrs, self.learner.bn_running
        step_bn = self.learner.step_bn
        return MetaModel(self.spec, {k: v.detach().cpu() for k, v in self.learner.params.items()},
                         None if lrs is None else {k: v.detach().cpu() for k, v in lrs.items()},
                         provenance or {},
                         None if step_lrs is None else {k: v.detach().cpu() for k, v in step_lrs.items()},
                         None if running is None else {k: v.detach().cpu().clone() for k, v in running.items()},
                         None if step_bn is None else {k: v.detach().cpu().clone() for k, v in step_bn.items()})

    def provenance(self, **extra) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "commit": git_commit(), "split": self.split_info,
                "iterations": self.iteration, "train_seconds": round(self.train_seconds, 1),
                "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                **({"init_from": self.init_info} if self.init_info else {}),
                **({"bn_running": self.running_provenance()} if self.learner.bn_running is not None else {}), **extra}

    def running_provenance(self) -> dict:
        """How the checkpoint's per-step running statistics were estimated (MAML++ BNRS during meta-training)."""
        return {"method": "ema", "momentum": self.cfg.bn_momentum, "updates": self.learner.bn_updates,
                "steps": self.cfg.inner_steps, "source": "support forward of every inner step, one update per task",
                "variance": "unbiased batch variance (as torch batch norm's running_var)",
                "init": "mean 0, var 1 (torch batch norm)", "split": self.cfg.split, "part": "train"}

    def request_stop(self) -> None:
        """Stop at the next log point (at most log_every iterations away) as if --max_seconds had run out: the state
        is saved, the best checkpoint kept and the final evaluation runs (`python -m trainer` calls this on SIGTERM
        or SIGINT in a single-process run, so a long run can be ended early without losing its evaluation)."""
        self.stop_requested = True

    # ---- loop ----
    def _log(self, record: dict):
        if self.rank:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def validate(self) -> float:
        """Accuracy (negative loss for regression) on the validation tasks; train() calls it only when there is a
        validation split."""
        make = self.samplers["val"]
        lr = self.learner.inner_lrs if self.learner.inner_lrs is not None else self.cfg.inner_lr
        res = evaluate(self.spec, self.learner.params, make(), self.cfg.val_tasks, self.cfg.test_steps, lr,
                       self.cfg.eval_chunk, policies=(self.cfg.bn_policy,), adapt_keys=self.learner.adapt_keys,
                       step_lrs=self.learner.step_lrs, step_bn=self.learner.step_bn)
        key = self.cfg.bn_policy if not self.spec.is_regression else "transductive"
        value = res[key]["mean"][-1]
        return -value if self.spec.is_regression else value

    def train(self):
        cfg = self.cfg
        if self.rank == 0:
            print(json.dumps({"config": dataclasses.asdict(cfg), "device": str(self.device), "world": self.world}))
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not cfg.progress or self.rank != 0,
                   desc=cfg.name, unit="it", dynamic_ncols=True)
        loss_sum = acc_sum = None
        window = 0
        t0 = session_start = last_save = time.perf_counter()
        while self.iteration < cfg.iterations:
            b = self.samplers["train"].sample(cfg.meta_batch)
            batch = (b.support_x, b.support_y, b.query_x, b.query_y)
            if self.world > 1:
                batch = rank_slice(batch, self.rank, self.world)
            loss, acc = self.learner.step(batch, self.world, self.iteration)
            loss_sum = loss.clone() if loss_sum is None else loss_sum + loss
            acc_sum = acc.clone() if acc_sum is None else acc_sum + acc
            window += 1
            self.iteration += 1
            bar.update(1)
            out_of_time = self.stop_requested or (cfg.max_seconds > 0
                                                  and time.perf_counter() - session_start > cfg.max_seconds)
            last = self.iteration == cfg.iterations or (out_of_time and self.iteration % cfg.log_every == 0)
            if self.iteration % cfg.log_every == 0 or last:
                record = {"iteration": self.iteration, "train_loss": (loss_sum / window).item(),
                          "train_acc": (acc_sum / window).item() * 100}
                loss_sum = acc_sum = None
                window = 0
                # a run without a validation split (--val_classes 0) logs no "val" (NaN is not JSON)
                if self.samplers["val"] is not None and (self.iteration % cfg.val_every == 0 or last):
                    self.train_seconds += time.perf_counter() - t0  # validation time is not training time
                    val = self.validate()
                    t0 = time.perf_counter()
                    record["val"] = val
                    if val > self.best_val and self.rank == 0:
                        self.best_val = val
                        save_checkpoint(self.dir / "best.pt", self.meta_model(self.provenance(best_val=val)))
                self.train_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                record["seconds"] = round(self.train_seconds, 2)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_acc']:.1f}",
                                val=f"{record.get('val', float('nan')):.2f}")
                self._log(record)
            due = cfg.checkpoint_seconds > 0 and time.perf_counter() - last_save > cfg.checkpoint_seconds
            if self.iteration % cfg.checkpoint_every == 0 or last or due:
                self._save_state()
                last_save = time.perf_counter()
            if last:
                break
        bar.close()
        if self.rank == 0:
            save_checkpoint(self.dir / "last.pt", self.meta_model(self.provenance()))
        return self
