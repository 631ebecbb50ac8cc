"""A Python client for the FastAdapt service, taking and returning numpy arrays, and its command line.

    client = FastAdaptClient("127.0.0.1:50051")
    adapted, prediction = client.adapt_and_predict("omniglot-5w1s", support_x, support_y, query_x)

Images: uint8 arrays [n, C, H, W] are raw pixels (the server preprocesses them; `load_image` makes them from a file);
float32/float16 arrays are taken as preprocessed. Failed calls raise grpc.RpcError (.code(), .details()).

Security: `FastAdaptClient(address, token=..., ca=..., client_cert=..., client_key=...)` sends
`authorization: Bearer <token>` on every call and speaks TLS (trusting `ca`, or the system roots with `tls=True`),
presenting a client certificate for mutual TLS. The CLI takes the same as --token (default $FASTADAPT_TOKEN), --ca,
--client-cert, --client-key, --tls and --tls-server-name.

CLI: adapt on a folder with one subfolder of images per class, then classify another folder:
    python -m server.client --address 127.0.0.1:50051 classify --model omniglot-5w1s --support DIR --query DIR
    python -m server.client --address 127.0.0.1:50051 models
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from server.tls import client_credentials
from server.wire import channel_options, decode, encode, pb, pb_grpc

TOKEN_ENV = "FASTADAPT_TOKEN"
# Sent on calls about one adaptation: a load balancer hashing on it (deploy/envoy.yaml) keeps them on one replica,
# whose near cache then holds the adaptation. Only a hint: with a shared store every replica can serve any id.
ADAPTATION_ID_HEADER = "x-adaptation-id"


def _about(adaptation_id: str) -> tuple[tuple[str, str], ...]:
    sendable = 0 < len(adaptation_id) <= 64 and adaptation_id.isascii() and adaptation_id.isprintable()
    return ((ADAPTATION_ID_HEADER, adaptation_id),) if sendable else ()  # a bad id is left for the server to refuse


@dataclass
class Adapted:
    adaptation_id: str  # empty when the adaptation was not kept
    model: str
    steps: int
    inner_lr: float
    support_loss: np.ndarray  # [steps + 1]
    support_accuracy: np.ndarray  # [steps + 1]
    timings: dict
    adaptation_bytes: int
    shared: bool = False  # every replica sharing the server's adaptation store can serve it
    store_warning: str = ""  # why not, when the server has a shared store


@dataclass
class Prediction:
    logits: np.ndarray  # [Q, N] float32
    labels: np.ndarray  # [Q] int
    probabilities: np.ndarray  # [Q, N] float32
    timings: dict


def _images(array) -> np.ndarray:
    array = np.asarray(array)
    return array.astype(np.float32) if array.dtype == np.float64 else array


def adapt_request(model: str, support_x, support_y, steps: int = 0, inner_lr: float = 0.0) -> pb.AdaptRequest:
    return pb.AdaptRequest(
        model=model,
        support_x=encode(_images(support_x)),
        support_y=[int(v) for v in np.asarray(support_y).reshape(-1)],
        steps=steps,
        inner_lr=inner_lr,
    )


def adapt_and_predict_request(
    model: str, support_x, support_y, query_x, steps: int = 0, inner_lr: float = 0.0, keep: bool = True
) -> pb.AdaptAndPredictRequest:
    return pb.AdaptAndPredictRequest(
        adapt=adapt_request(model, support_x, support_y, steps, inner_lr),
        query_x=encode(_images(query_x)),
        skip_cache=not keep,
    )


def timings_dict(t: pb.Timings) -> dict:
    return {
        "queue_ms": t.queue_ms, "adapt_ms": t.adapt_ms, "predict_ms": t.predict_ms, "total_ms": t.total_ms,
        "batch_tasks": t.batch_tasks,
    }


def to_adapted(r: pb.AdaptResponse) -> Adapted:
    return Adapted(
        adaptation_id=r.adaptation_id,
        model=r.model,
        steps=r.steps,
        inner_lr=r.inner_lr,
        support_loss=np.asarray(r.support_loss, dtype=np.float32),
        support_accuracy=np.asarray(r.support_accuracy, dtype=np.float32),
        timings=timings_dict(r.timings),
        adaptation_bytes=r.adaptation_bytes,
        shared=r.shared,
        store_warning=r.store_warning,
    )


def to_prediction(r: pb.PredictResponse) -> Prediction:
    return Prediction(
        logits=decode(r.logits, "logits").copy(),
        labels=np.asarray(r.labels, dtype=np.int64),
        probabilities=decode(r.probabilities, "probabilities").copy(),
        timings=timings_dict(r.timings),
    )


def model_info_dict(m: pb.ModelInfo) -> dict:
    return {
        "name": m.name, "arch": m.arch, "ways": m.ways, "input_shape": tuple(m.input_shape),
        "input_dtype": pb.DType.Name(m.input_dtype), "accepted_dtypes": [pb.DType.Name(d) for d in m.accepted_dtypes],
        "default_steps": m.default_steps, "default_inner_lr": m.default_inner_lr,
        "learned_inner_lr": m.learned_inner_lr, "bn_policy": m.bn_policy, "preprocessing": m.preprocessing,
        "provenance": dict(m.provenance), "num_params": m.num_params, "max_steps": m.max_steps,
        "max_support": m.max_support, "max_queries": m.max_queries, "max_support_steps": m.max_support_steps,
        "ready": m.ready, "not_ready_reason": m.not_ready_reason, "recipe": m.recipe, "adapt_params": m.adapt_params,
        "head_init": m.head_init,
        "support_views": m.support_views, "query_views": m.query_views,
        "kind": m.kind, "observation_size": m.observation_size, "action_size": m.action_size, "discount": m.discount,
        "baseline": m.baseline, "output_size": m.output_size, "action_low": m.action_low, "action_high": m.action_high,
        "per_step_bn_steps": m.per_step_bn_steps,
    }


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (over TLS or, behind a TLS-terminating proxy, plaintext)."""

    def __init__(self, token: str):
        token = token.strip()
        if not token or any(c.isspace() or not c.isprintable() for c in token):
            raise ValueError("the token (--token or $FASTADAPT_TOKEN) is empty or holds whitespace or control "
                             "characters, expected one line of the server's --auth-tokens file")
        self._entry = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation, details, request):
        metadata = [*(details.metadata or ()), self._entry]
        details = _CallDetails(details.method, details.timeout, metadata, details.credentials,
                               details.wait_for_ready, details.compression)
        return continuation(details, request)


class FastAdaptClient:
    """Blocking client; `timeout` (seconds) is the default deadline of every call.

    `token`: sent as `authorization: Bearer <token>`. TLS when `ca`, `client_cert` or `tls` is given: `ca` is the
    PEM file of the CA to trust (None: the system roots), `client_cert`/`client_key` a client certificate for mutual
    TLS, `server_name` the name to verify the server's certificate against when it differs from the address' host.
    """

    def __init__(self, address: str, timeout: float | None = 60.0, *, token: str | None = None, ca=None,
                 client_cert=None, client_key=None, tls: bool = False, server_name: str | None = None):
        self.address, self.timeout = address, timeout
        options = channel_options()
        if tls or ca is not None or client_cert is not None or client_key is not None:
            credentials = client_credentials(ca, client_cert, client_key)
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        calls = grpc.intercept_channel(self.channel, _BearerToken(token)) if token is not None else self.channel
        self.stub = pb_grpc.FastAdaptStub(calls)

    def __enter__(self) -> FastAdaptClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def _t(self, timeout):
        return self.timeout if timeout is None else timeout

    def list_models(self, timeout=None) -> list[dict]:
        response = self.stub.ListModels(pb.ListModelsRequest(), timeout=self._t(timeout))
        return [model_info_dict(m) for m in response.models]

    def get_model(self, model: str, timeout=None) -> dict:
        return model_info_dict(self.stub.GetModel(pb.GetModelRequest(model=model), timeout=self._t(timeout)).model)

    def adapt(self, model: str, support_x, support_y, steps: int = 0, inner_lr: float = 0.0, timeout=None) -> Adapted:
        request = adapt_request(model, support_x, support_y, steps, inner_lr)
        return to_adapted(self.stub.Adapt(request, timeout=self._t(timeout)))

    def predict(self, adaptation_id: str, query_x, timeout=None) -> Prediction:
        request = pb.PredictRequest(adaptation_id=adaptation_id, query_x=encode(_images(query_x)))
        return to_prediction(self.stub.Predict(request, timeout=self._t(timeout), metadata=_about(adaptation_id)))

    def adapt_and_predict(
        self, model: str, support_x, support_y, query_x, steps: int = 0, inner_lr: float = 0.0, keep: bool = True,
        timeout=None,
    ) -> tuple[Adapted, Prediction]:
        request = adapt_and_predict_request(model, support_x, support_y, query_x, steps, inner_lr, keep)
        response = self.stub.AdaptAndPredict(request, timeout=self._t(timeout))
        return to_adapted(response.adapt), to_prediction(response.predict)

    def export_adapted(self, adaptation_id: str, timeout=None) -> bytes:
        request = pb.ExportAdaptedRequest(adaptation_id=adaptation_id)
        return self.stub.ExportAdapted(request, timeout=self._t(timeout), metadata=_about(adaptation_id)).onnx_model

    def release(self, adaptation_id: str, timeout=None) -> int:
        request = pb.ReleaseRequest(adaptation_id=adaptation_id)
        return self.stub.Release(request, timeout=self._t(timeout), metadata=_about(adaptation_id)).freed_bytes

    # ---- multi-step adaptation, meta-initializations, regressors and policies (ModelInfo.kind) ----------------
    def adapt_from(self, adaptation_id: str, support_x, support_y, steps: int = 0, inner_lr: float = 0.0,
                   timeout=None) -> Adapted:
        """More steps on a classifier's adaptation: a new adaptation starting from `adaptation_id`'s weights."""
        request = adapt_request("", support_x, support_y, steps, inner_lr)
        request.from_adaptation_id = adaptation_id
        return to_adapted(self.stub.Adapt(request, timeout=self._t(timeout), metadata=_about(adaptation_id)))

    def adapt_policy(self, model: str, observations, actions, rewards, lengths, inner_lr: float = 0.0,
                     from_adaptation_id: str = "", timeout=None) -> Adapted:
        """One VPG step on one task's trajectories (observations [B, H, obs_dim], actions [B, H, act_dim] as
        sampled, rewards [B, H], lengths [B]) from the meta-policy or from `from_adaptation_id`."""
        request = pb.AdaptRequest(model=model, inner_lr=inner_lr, from_adaptation_id=from_adaptation_id,
                                  trajectories=trajectories_message(observations, actions, rewards, lengths))
        return to_adapted(self.stub.Adapt(request, timeout=self._t(timeout), metadata=_about(from_adaptation_id)))

    def act(self, observations, adaptation_id: str = "", model: str = "", timeout=None) -> Actions:
        """The action distribution of an adapted policy (or, with `model` and no id, of its meta-policy) at
        observations [Q, obs_dim]."""
        request = pb.PredictRequest(adaptation_id=adaptation_id, model=model,
                                    query_x=encode(np.asarray(observations, dtype=np.float32)))
        return to_actions(self.stub.Predict(request, timeout=self._t(timeout), metadata=_about(adaptation_id)))

    def adapt_regressor(self, model: str, support_x, support_targets, steps: int = 0, inner_lr: float = 0.0,
                        from_adaptation_id: str = "", timeout=None) -> Adapted:
        """Adapt a regressor to inputs [N*K, in_dim] and targets [N*K, out_dim] (float32)."""
        request = pb.AdaptRequest(model=model, steps=steps, inner_lr=inner_lr, from_adaptation_id=from_adaptation_id,
                                  support_x=encode(np.asarray(support_x, dtype=np.float32)),
                                  support_targets=encode(np.asarray(support_targets, dtype=np.float32)))
        return to_adapted(self.stub.Adapt(request, timeout=self._t(timeout), metadata=_about(from_adaptation_id)))

    def regress(self, query_x, adaptation_id: str = "", model: str = "", timeout=None) -> np.ndarray:
        """A regressor's outputs [Q, out_dim] at inputs [Q, in_dim]: adapted, or the meta-initialization's."""
        request = pb.PredictRequest(adaptation_id=adaptation_id, model=model,
                                    query_x=encode(np.asarray(query_x, dtype=np.float32)))
        response = self.stub.Predict(request, timeout=self._t(timeout), metadata=_about(adaptation_id))
        return decode(response.outputs, "outputs").copy()


@dataclass
class Actions:
    """A policy's Gaussian over actions: sample a = mean + exp(log_std) * N(0, 1) (the environment clips)."""

    mean: np.ndarray  # [Q, act_dim] float32
    log_std: np.ndarray  # [act_dim] float32
    timings: dict


def to_actions(r: pb.PredictResponse) -> Actions:
    return Actions(mean=decode(r.action_mean, "action_mean").copy(),
                   log_std=decode(r.action_log_std, "action_log_std").copy(), timings=timings_dict(r.timings))


def trajectories_message(observations, actions, rewards, lengths) -> pb.Trajectories:
    """One task's trajectories as the wire carries them (float32; lengths B values in [1, H])."""
    return pb.Trajectories(observations=encode(np.asarray(observations, dtype=np.float32)),
                           actions=encode(np.asarray(actions, dtype=np.float32)),
                           rewards=encode(np.asarray(rewards, dtype=np.float32)),
                           lengths=[int(v) for v in np.asarray(lengths).reshape(-1)])


# ---- images ---------------------------------------------------------------------------------------------------
# uint8 on the wire means raw pixels as the data set stores them, resized to the model's input size: these helpers
# resize with LANCZOS and keep the data set's colours (Omniglot: dark strokes on white); the server preprocesses.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_image(source: str | os.PathLike | bytes, input_shape: tuple[int, ...]) -> np.ndarray:
    """A picture (path or encoded bytes) as uint8 [C, H, W] at input_shape, resized with LANCZOS."""
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise ValueError(f"input_shape {tuple(input_shape)}, expected (C, H, W) with C = 1 (grayscale) or 3 (RGB)")
    channels, height, width = input_shape
    handle = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    with Image.open(handle) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.LANCZOS)
        pixels = np.asarray(img, dtype=np.uint8)
    return pixels[None] if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_labelled_folder(root: str | os.PathLike, input_shape) -> tuple[np.ndarray, np.ndarray, list[str], list[Path]]:
    """A folder with one subfolder of pictures per class -> (x uint8 [n, C, H, W], labels [n], class names, paths).

    Classes are the subfolders in sorted order; label i is class_names[i].
    """
    root = Path(root)
    classes = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise ValueError(f"{root}: expected a folder with one subfolder of images per class")
    images, labels, paths = [], [], []
    for label, folder in enumerate(classes):
        files = image_files(folder)
        if not files:
            raise ValueError(f"{folder}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            images.append(load_image(path, input_shape))
            labels.append(label)
            paths.append(path)
    return np.stack(images), np.asarray(labels, dtype=np.int64), [c.name for c in classes], paths


def load_flat_folder(root: str | os.PathLike, input_shape) -> tuple[np.ndarray, list[Path]]:
    """Every picture directly inside root -> (x uint8 [n, C, H, W], paths)."""
    root = Path(root)
    files = image_files(root) if root.is_dir() else []
    if not files:
        raise ValueError(f"{root}: expected a folder of images ({', '.join(IMAGE_SUFFIXES)})")
    return np.stack([load_image(p, input_shape) for p in files]), files


# ---- command line ---------------------------------------------------------------------------------------------
def add_connection_args(p: argparse.ArgumentParser) -> None:
    """--token, --ca, --client-cert, --client-key, --tls, --tls-server-name (also used by the demo)."""
    g = p.add_argument_group("connection security")
    g.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"bearer token sent as 'authorization: Bearer <token>' (default: ${TOKEN_ENV})")
    g.add_argument("--ca", type=Path, metavar="FILE", help="speak TLS, trusting this PEM CA certificate")
    g.add_argument("--client-cert", type=Path, metavar="FILE", help="PEM client certificate (mutual TLS)")
    g.add_argument("--client-key", type=Path, metavar="FILE", help="PEM private key of --client-cert")
    g.add_argument("--tls", action="store_true", help="speak TLS, trusting the system's CA roots (without --ca)")
    g.add_argument("--tls-server-name", metavar="NAME", help="name to verify the server certificate against")


def connection_kwargs(args: argparse.Namespace) -> dict:
    """FastAdaptClient keyword arguments from add_connection_args' flags."""
    return {"token": args.token or None, "ca": args.ca, "client_cert": args.client_cert,
            "client_key": args.client_key, "tls": args.tls, "server_name": args.tls_server_name}


def _classify(client: FastAdaptClient, args) -> int:
    info = client.get_model(args.model)
    shape = info["input_shape"]
    support_x, support_y, classes, _ = load_labelled_folder(args.support, shape)
    if len(classes) != info["ways"]:
        print(f"error: {args.support} has {len(classes)} class folders, model {args.model} is {info['ways']}-way",
              file=sys.stderr)
        return 2
    query = Path(args.query)
    labelled = any(p.is_dir() for p in query.iterdir()) if query.is_dir() else False
    if labelled:
        query_x, query_y, query_classes, paths = load_labelled_folder(query, shape)
        unknown = sorted(set(query_classes) - set(classes))
        if unknown:
            print(f"error: query classes {unknown} are not among the support classes {classes}", file=sys.stderr)
            return 2
        truth = np.asarray([classes.index(query_classes[y]) for y in query_y])
    else:
        query_x, paths = load_flat_folder(query, shape)
        truth = None
    adapted, prediction = client.adapt_and_predict(
        args.model, support_x, support_y, query_x, steps=args.steps, inner_lr=args.inner_lr
    )
    print(f"adapted {args.model} on {len(support_y)} images of {len(classes)} classes: {adapted.steps} steps, "
          f"support loss {adapted.support_loss[0]:.3f} -> {adapted.support_loss[-1]:.3f}, "
          f"adaptation id {adapted.adaptation_id}, server time {adapted.timings['total_ms']:.1f} ms")
    for path, label, probs in zip(paths, prediction.labels, prediction.probabilities):
        print(f"{path}\t{classes[label]}\t{probs[label]:.3f}")
    if truth is not None:
        print(f"accuracy {np.mean(prediction.labels == truth):.3f} on {len(truth)} query images")
    if args.export:
        Path(args.export).write_bytes(client.export_adapted(adapted.adaptation_id))
        print(f"wrote the adapted network as ONNX to {args.export}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.client", description="fastadapt gRPC client")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline per call, seconds")
    add_connection_args(p)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the served models")
    c = sub.add_parser("classify", help="adapt on --support (a subfolder per class) and classify --query")
    c.add_argument("--model", required=True)
    c.add_argument("--support", required=True, type=Path, help="folder with one subfolder of images per class")
    c.add_argument("--query", required=True, type=Path, help="folder of images (or a subfolder per class)")
    c.add_argument("--steps", type=int, default=0, help="inner steps (0 = model default)")
    c.add_argument("--inner-lr", type=float, default=0.0, help="inner learning rate (0 = model default)")
    c.add_argument("--export", type=Path, default=None, help="also write the adapted network as ONNX here")
    args = p.parse_args(argv)
    try:
        client = FastAdaptClient(args.address, timeout=args.timeout, **connection_kwargs(args))
    except ValueError as exc:  # a bad --ca / --client-cert / --client-key file or --token
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            if args.command == "models":
                for m in client.list_models():
                    print(f"{m['name']}\t{m['arch']}\t{m['ways']}-way\tinput {list(m['input_shape'])}\t"
                          f"steps {m['default_steps']}\tlr {m['default_inner_lr']:g}\tbn {m['bn_policy']}")
                return 0
            return _classify(client, args)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except (OSError, ValueError) as exc:  # unreadable folder or image
            print(f"error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
