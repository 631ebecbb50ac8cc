"""The models a server serves: every checkpoint (*.pt) in --model-dir, loaded onto the engine's device by name."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from models.checkpoint import CheckpointError, MetaModel, load_checkpoint
from models.functional import num_params
from server.status import NotFound
from server.telemetry import get_logger

# The wire carries class labels; a regression model (targets instead of labels) cannot be served through it.
SERVABLE_ARCHS = ("conv4-omniglot", "conv4-miniimagenet", "mlp-omniglot")


class ModelRegistry:
    def __init__(self, models: dict[str, MetaModel]):
        self._models = dict(sorted(models.items()))
        self.loaded_on = threading.get_ident()  # the thread that ran the torch work of loading

    @classmethod
    def from_dir(cls, model_dir: str | Path, device="cpu") -> ModelRegistry:
        """Load every *.pt in model_dir. Refuses an empty folder, a broken checkpoint and a duplicate name."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"--model-dir {model_dir} is not a directory, expected a folder of *.pt files")
        log = get_logger()
        models: dict[str, MetaModel] = {}
        sources: dict[str, Path] = {}
        for path in sorted(model_dir.glob("*.pt")):
            model = load_checkpoint(path, device=device)  # CheckpointError names the file
            name = model.spec.name
            if model.spec.arch not in SERVABLE_ARCHS:
                log.warning(
                    "model skipped",
                    extra={"model": name, "file": str(path), "reason": f"{model.spec.arch} is not a classifier"},
                )
                continue
            if name in models:
                raise CheckpointError(f"{path}: model name {name!r} is taken by {sources[name]}, expected unique names")
            models[name], sources[name] = model, path
            log.info("model loaded", extra={"model": name, "file": str(path), "spec": model.spec.to_dict()})
        if not models:
            raise FileNotFoundError(f"--model-dir {model_dir} holds no servable checkpoint (*.pt of {SERVABLE_ARCHS})")
        return cls(models)

    def __len__(self) -> int:
        return len(self._models)

    def __iter__(self):
        return iter(self._models.values())

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str, field: str = "model") -> MetaModel:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"{field} {name!r} is not served here, expected one of {self.names()}")
        return model


def provenance_summary(provenance: dict, max_chars: int = 500) -> dict[str, str]:
    """Top-level provenance entries as strings (nested values as compact JSON, truncated)."""
    summary = {}
    for key, value in provenance.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        summary[str(key)] = text if len(text) <= max_chars else text[: max_chars - 3] + "..."
    return summary


def parameter_count(model: MetaModel) -> int:
    return num_params(model.spec)
