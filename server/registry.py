"""The models a server serves: every checkpoint (*.pt) in --model-dir, loaded onto the engine's device by name.

Readiness is per model (as KServe and Triton report it): a checkpoint that cannot be loaded is named in the log and
listed as not ready (ListModels / GetModel say why; Adapt on it is UNAVAILABLE) while the others serve.
`strict=True` (`--strict-models`) refuses to start instead.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from models.checkpoint import CheckpointError, MetaModel
from models.kinds import load_model, model_kind, num_parameters
from server.status import InvalidArgument, NotFound, Unavailable, clip
from server.telemetry import get_logger

MAX_NAME_CHARS = 128  # a model name from a client longer than this is refused before any lookup

# Classifiers (class labels), the sinusoid regressor (float targets: AdaptRequest.support_targets); policy files
# (models.policy, MAML-RL) are served too (server.kinds).
SERVABLE_ARCHS = ("conv4-omniglot", "conv4-miniimagenet", "mlp-omniglot", "mlp-sinusoid")


class ModelRegistry:
    def __init__(self, models: dict[str, MetaModel], not_ready: dict[str, str] | None = None):
        self._models = dict(sorted(models.items()))
        self.not_ready = dict(sorted((not_ready or {}).items()))  # name (file stem) -> why it is not served
        self.loaded_on = threading.get_ident()  # the thread that ran the torch work of loading

    @classmethod
    def from_dir(cls, model_dir: str | Path, device="cpu", strict: bool = False) -> ModelRegistry:
        """Load every *.pt in model_dir. Refuses an empty folder and a duplicate name; a broken checkpoint is
        reported not ready (strict: refused)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"--model-dir {model_dir} is not a directory, expected a folder of *.pt files")
        log = get_logger()
        models: dict[str, MetaModel] = {}
        sources: dict[str, Path] = {}
        not_ready: dict[str, str] = {}
        for path in sorted(model_dir.glob("*.pt")):
            try:
                model = load_model(path, device=device)  # either format; CheckpointError names the file
            except CheckpointError as exc:
                if strict:
                    raise
                not_ready[path.stem] = str(exc)
                log.error("model not ready", extra={"model": path.stem, "file": str(path), "reason": str(exc)})
                continue
            name = model.spec.name
            if model_kind(model) != "policy" and model.spec.arch not in SERVABLE_ARCHS:
                log.warning(
                    "model skipped",
                    extra={"model": name, "file": str(path), "reason": f"{model.spec.arch} is not served"},
                )
                continue
            if name in models:
                raise CheckpointError(f"{path}: model name {name!r} is taken by {sources[name]}, expected unique names")
            models[name], sources[name] = model, path
            log.info("model loaded", extra={"model": name, "file": str(path), "kind": model_kind(model),
                                            "spec": model.spec.to_dict()})
        if not models:
            broken = f"; not loadable: {not_ready}" if not_ready else ""
            raise FileNotFoundError(
                f"--model-dir {model_dir} holds no servable checkpoint (*.pt of {SERVABLE_ARCHS}){broken}")
        return cls(models, {k: v for k, v in not_ready.items() if k not in models})

    def __len__(self) -> int:
        return len(self._models)

    def __iter__(self):
        return iter(self._models.values())

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str, field: str = "model") -> MetaModel:
        if len(name) > MAX_NAME_CHARS:
            raise InvalidArgument(f"{field} {clip(name)} is longer than {MAX_NAME_CHARS} characters, expected a model "
                                  f"name from ListModels")
        model = self._models.get(name)
        if model is None:
            if name in self.not_ready:
                raise Unavailable(f"{field} {clip(name)} is not ready: {self.not_ready[name]}")
            raise NotFound(f"{field} {clip(name)} is not served here, expected one of {self.names()}")
        return model


def provenance_summary(provenance: dict, max_chars: int = 500) -> dict[str, str]:
    """Top-level provenance entries as strings (nested values as compact JSON, truncated)."""
    summary = {}
    for key, value in provenance.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        summary[str(key)] = text if len(text) <= max_chars else text[: max_chars - 3] + "..."
    return summary


def parameter_count(model) -> int:
    return num_parameters(model)
