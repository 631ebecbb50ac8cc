"""Policies (MAML-RL), the sinusoid regressor and multi-step adaptation, served over loopback by a real server.

References are the code the trainer runs: trainer.rl's sampler, baseline and VPG step for policies, models.maml's
adapt and forward for the regressor and the classifiers. The bundled navigation-2d policy and sinusoid regressor
(models/zoo) are served beside tiny classifiers.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.functional import forward
from models.maml import adapt as maml_adapt
from models.maml import predict as maml_predict
from models.policy import load_policy, policy_forward
from models.preprocess import preprocess_uint8
from server import rl_demo
from server.client import FastAdaptClient, trajectories_message
from server.status import MAX_DETAILS_BYTES
from server.wire import encode, pb
from tests.server.conftest import TINY_SPECS, random_task, write_models
from trainer.rl.baseline import advantages
from trainer.rl.evaluate import evaluate_policy
from trainer.rl.navigation import Navigation2D
from trainer.rl.sampler import sample_trajectories
from trainer.rl.vpg import adapt as vpg_adapt

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"
POLICY, REGRESSOR = "navigation-2d", "sinusoid-k10"
TIGHT = {"atol": 1e-6, "rtol": 1e-5}
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="session")
def kinds_dir(tmp_path_factory) -> Path:
    folder = write_models(tmp_path_factory.mktemp("kinds"), [TINY_SPECS["tiny-5w"], TINY_SPECS["tiny-5w-td"]])
    shutil.copyfile(ZOO / f"{POLICY}.pt", folder / f"{POLICY}.pt")
    shutil.copyfile(ZOO / f"{REGRESSOR}.pt", folder / f"{REGRESSOR}.pt")
    return folder


@pytest.fixture
def kserver(make_server, kinds_dir):
    return make_server(model_dir=kinds_dir, warmup="auto")


@pytest.fixture
def kclient(kserver):
    with FastAdaptClient(kserver.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def nav():
    return load_policy(ZOO / f"{POLICY}.pt")


def rollout(spec, params, seed: int, batch: int = 8, goal=(0.3, -0.2)):
    """One task's trajectories [1, B, H, ...] sampled by the trainer's sampler."""
    env = Navigation2D()
    return sample_trajectories(env, spec, params, torch.tensor([goal], dtype=torch.float64), batch,
                               torch.Generator().manual_seed(seed))


def trainer_step(spec, params, traj, lr: float):
    """The trainer's inner step (as trainer.rl.evaluate takes it): shared or stacked params -> stacked [1, ...]."""
    adv = advantages(traj, spec.discount, 1e-5, True)
    return vpg_adapt(spec, params, traj, adv, lr)


def send(client, model: str, traj, inner_lr: float = 0.0, from_id: str = ""):
    return client.adapt_policy(model, traj.observations[0].numpy(), traj.actions[0].numpy(), traj.rewards[0].numpy(),
                               traj.lengths[0].numpy(), inner_lr=inner_lr, from_adaptation_id=from_id)


def served_params(server, adaptation_id: str) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in server.cache.find(adaptation_id).params.items()}


# ---- model info -------------------------------------------------------------------------------------------------

def test_models_report_their_kind_sizes_discount_and_baseline(kclient, nav):
    models = {m["name"]: m for m in kclient.list_models()}
    assert set(models) == {"tiny-5w", "tiny-5w-td", POLICY, REGRESSOR}
    assert models["tiny-5w"]["kind"] == "classifier" and models["tiny-5w"]["input_dtype"] == "UINT8"
    info = kclient.get_model(POLICY)
    assert info["kind"] == "policy"
    assert (info["observation_size"], info["action_size"]) == (nav.spec.obs_dim, nav.spec.act_dim) == (2, 2)
    assert info["discount"] == pytest.approx(0.99) and info["baseline"].startswith("linear-feature (ridge 1e-05")
    assert (info["action_low"], info["action_high"]) == (pytest.approx(-0.1), pytest.approx(0.1))
    assert info["default_inner_lr"] == pytest.approx(0.1) and info["default_steps"] == 1
    assert info["input_shape"] == (2,) and info["accepted_dtypes"] == ["FLOAT32"]
    assert info["num_params"] == sum(v.numel() for v in nav.params.values())
    reg = kclient.get_model(REGRESSOR)
    assert reg["kind"] == "regressor" and reg["output_size"] == 1 and reg["input_shape"] == (1,)
    assert reg["input_dtype"] == "FLOAT32" and reg["accepted_dtypes"] == ["FLOAT32"]
    assert "meta_test" in reg["provenance"]


# ---- policies ---------------------------------------------------------------------------------------------------

def test_served_policy_adaptation_equals_the_trainers_inner_step(kclient, kserver, nav):
    traj = rollout(nav.spec, nav.params, seed=1)
    adapted = send(kclient, POLICY, traj)
    assert adapted.steps == 1 and adapted.inner_lr == pytest.approx(0.1) and adapted.adaptation_id
    assert adapted.support_loss.shape == (2,) and adapted.support_accuracy.shape == (0,)
    want = trainer_step(nav.spec, nav.params, traj, 0.1)
    got = served_params(kserver, adapted.adaptation_id)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name][0], **TIGHT)
    moved = sum((want[k][0] - nav.params[k]).abs().sum().item() for k in want)
    assert moved > 1e-3  # the step changed the policy: equality above is not vacuous
    obs = traj.observations[0, :, 5].numpy()
    actions = kclient.act(obs, adaptation_id=adapted.adaptation_id)
    mean, log_std = policy_forward(nav.spec, {k: v[0] for k, v in want.items()}, torch.from_numpy(obs))
    np.testing.assert_allclose(actions.mean, mean.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(actions.log_std, log_std.numpy(), atol=1e-6)


def test_two_policy_steps_from_an_adaptation_equal_two_trainer_steps(kclient, kserver, nav):
    traj1 = rollout(nav.spec, nav.params, seed=2)
    first = trainer_step(nav.spec, nav.params, traj1, 0.1)
    traj2 = rollout(nav.spec, first, seed=3)  # sampled with the adapted policy, as evaluation does
    second = trainer_step(nav.spec, first, traj2, 0.05)
    a1 = send(kclient, POLICY, traj1)
    a2 = send(kclient, POLICY, traj2, inner_lr=0.05, from_id=a1.adaptation_id)
    assert a2.adaptation_id != a1.adaptation_id and a2.steps == 1 and a2.inner_lr == pytest.approx(0.05)
    assert kserver.cache.find(a2.adaptation_id).steps == 2  # the stored adaptation counts both steps
    got = served_params(kserver, a2.adaptation_id)
    for name in second:
        torch.testing.assert_close(got[name], second[name][0], **TIGHT)
    for name in first:  # the first adaptation is untouched
        torch.testing.assert_close(served_params(kserver, a1.adaptation_id)[name], first[name][0], **TIGHT)


def test_predict_with_the_meta_policy_equals_the_policy_forward(kclient, nav):
    obs = np.random.default_rng(0).uniform(-0.5, 0.5, size=(7, 2)).astype(np.float32)
    actions = kclient.act(obs, model=POLICY)
    mean, log_std = policy_forward(nav.spec, nav.params, torch.from_numpy(obs))
    np.testing.assert_allclose(actions.mean, mean.numpy(), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(actions.log_std, log_std.numpy(), atol=1e-7)
    assert actions.mean.shape == (7, 2) and actions.log_std.shape == (2,)


def test_entries_past_a_trajectorys_length_are_ignored(kclient, kserver, nav):
    traj = rollout(nav.spec, nav.params, seed=4)
    lengths = np.array([100, 60, 1, 100, 37, 100, 100, 2])
    obs, act, rew = (x[0].numpy().copy() for x in (traj.observations, traj.actions, traj.rewards))
    valid = np.arange(100)[None] < lengths[:, None]
    clean = [np.where(valid[..., None], obs, 0), np.where(valid[..., None], act, 0), np.where(valid, rew, 0)]
    noisy = [np.where(valid[..., None], obs, np.nan), np.where(valid[..., None], act, 1e6), np.where(valid, rew, -5)]
    a = kclient.adapt_policy(POLICY, *clean, lengths)
    b = kclient.adapt_policy(POLICY, *noisy, lengths)
    pa, pb_ = served_params(kserver, a.adaptation_id), served_params(kserver, b.adaptation_id)
    for name in pa:
        torch.testing.assert_close(pa[name], pb_[name], atol=0, rtol=0)


def test_adapt_and_predict_of_a_policy_acts_with_the_adapted_policy(kclient, nav):
    traj = rollout(nav.spec, nav.params, seed=5)
    obs = np.array([[0.0, 0.0], [0.1, -0.1]], dtype=np.float32)
    request = pb.AdaptAndPredictRequest(
        adapt=pb.AdaptRequest(model=POLICY, trajectories=trajectories_message(
            traj.observations[0].numpy(), traj.actions[0].numpy(), traj.rewards[0].numpy(), traj.lengths[0].numpy())),
        query_x=encode(obs))
    response = kclient.stub.AdaptAndPredict(request, timeout=60)
    want = trainer_step(nav.spec, nav.params, traj, 0.1)
    mean, _ = policy_forward(nav.spec, {k: v[0] for k, v in want.items()}, torch.from_numpy(obs))
    got = np.frombuffer(response.predict.action_mean.data, dtype="<f4").reshape(2, 2)
    np.testing.assert_allclose(got, mean.numpy(), atol=1e-5, rtol=1e-5)


def test_policy_work_runs_on_the_engine_thread(kclient, kserver, nav, monkeypatch):
    import server.policy as served

    threads = []
    original_adapt, original_forward = served.adapt_policy, served.policy_forward
    monkeypatch.setattr(served, "adapt_policy", lambda *a, **k: threads.append(threading.get_ident())
                        or original_adapt(*a, **k))
    monkeypatch.setattr(served, "policy_forward", lambda *a, **k: threads.append(threading.get_ident())
                        or original_forward(*a, **k))
    adapted = send(kclient, POLICY, rollout(nav.spec, nav.params, seed=6))
    kclient.act(np.zeros((3, 2), np.float32), adaptation_id=adapted.adaptation_id)
    assert len(threads) >= 2 and set(threads) == {kserver.batcher.worker_ident}


# ---- classifiers: multi-step ------------------------------------------------------------------------------------

def test_classifier_steps_from_an_adaptation_equal_two_successive_adaptations(kclient, kserver, kinds_dir):
    spec = TINY_SPECS["tiny-5w"]
    model = load_checkpoint(kinds_dir / "tiny-5w.pt")
    sx1, sy1, qx = random_task(spec, shots=2, queries=6, seed=11)
    sx2, sy2, _ = random_task(spec, shots=1, queries=1, seed=12)
    a1 = kclient.adapt(spec.name, sx1, sy1, steps=2)
    a2 = kclient.adapt_from(a1.adaptation_id, sx2, sy2, steps=3, inner_lr=0.05)
    assert a2.steps == 3 and kserver.cache.find(a2.adaptation_id).steps == 5
    served = kclient.predict(a2.adaptation_id, qx).logits

    x1, x2 = (preprocess_uint8(spec, torch.from_numpy(x)[None]) for x in (sx1, sx2))
    fast = maml_adapt(spec, model.params, x1, torch.from_numpy(sy1)[None], 2, spec.inner_lr).params
    fast = maml_adapt(spec, fast, x2, torch.from_numpy(sy2)[None], 3, 0.05).params
    want = maml_predict(spec, fast, preprocess_uint8(spec, torch.from_numpy(qx)[None]), support_x=x2)[0]
    np.testing.assert_allclose(served, want.detach().numpy(), atol=1e-4, rtol=1e-4)
    # the same support set twice is one longer adaptation
    b1 = kclient.adapt(spec.name, sx1, sy1, steps=1)
    b2 = kclient.adapt_from(b1.adaptation_id, sx1, sy1, steps=1)
    c = kclient.adapt(spec.name, sx1, sy1, steps=2)
    np.testing.assert_allclose(kclient.predict(b2.adaptation_id, qx).logits,
                               kclient.predict(c.adaptation_id, qx).logits, atol=1e-5, rtol=1e-5)


def test_meta_initialization_of_a_transductive_classifier_predicts(kclient, kinds_dir):
    spec = TINY_SPECS["tiny-5w-td"]
    model = load_checkpoint(kinds_dir / "tiny-5w-td.pt")
    _, _, qx = random_task(spec, queries=4, seed=3)
    response = kclient.stub.Predict(pb.PredictRequest(model=spec.name, query_x=encode(qx)), timeout=60)
    got = np.frombuffer(response.logits.data, dtype="<f4").reshape(4, spec.ways)
    query = preprocess_uint8(spec, torch.from_numpy(qx)[None])
    want = forward(spec, {k: v[None] for k, v in model.params.items()}, query)
    np.testing.assert_allclose(got, want[0].detach().numpy(), atol=1e-5, rtol=1e-5)


# ---- the regressor ----------------------------------------------------------------------------------------------

def sinusoid_task(seed: int, n: int = 10, q: int = 7):
    rng = np.random.default_rng(seed)
    amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
    x = rng.uniform(-5, 5, size=(n + q, 1)).astype(np.float32)
    y = (amplitude * np.sin(x - phase)).astype(np.float32)
    return x[:n], y[:n], x[n:], y[n:]


def test_served_sinusoid_regressor_equals_maml_adapt_and_forward(kclient):
    model = load_checkpoint(ZOO / f"{REGRESSOR}.pt")
    sx, sy, qx, qy = sinusoid_task(0)
    adapted = kclient.adapt_regressor(REGRESSOR, sx, sy, steps=5)
    assert adapted.steps == 5 and adapted.support_loss.shape == (6,) and adapted.support_accuracy.shape == (0,)
    served = kclient.regress(qx, adaptation_id=adapted.adaptation_id)
    result = maml_adapt(model.spec, model.params, torch.from_numpy(sx)[None], torch.from_numpy(sy)[None], 5,
                        model.spec.inner_lr, track=True)
    want = forward(model.spec, result.params, torch.from_numpy(qx)[None])[0].detach().numpy()
    assert served.shape == (7, 1)
    np.testing.assert_allclose(served, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(adapted.support_loss, result.support_loss[:, 0].numpy(), atol=1e-5, rtol=1e-5)
    assert adapted.support_loss[-1] < adapted.support_loss[0]  # it fits the task
    request = pb.AdaptAndPredictRequest(adapt=pb.AdaptRequest(model=REGRESSOR, steps=5, support_x=encode(sx),
                                                               support_targets=encode(sy)),
                                        query_x=encode(qx), skip_cache=True)
    response = kclient.stub.AdaptAndPredict(request, timeout=60)
    assert response.adapt.adaptation_id == "" and response.adapt.steps == 5
    np.testing.assert_allclose(np.frombuffer(response.predict.outputs.data, "<f4").reshape(7, 1), want, atol=1e-5,
                               rtol=1e-5)
    meta = kclient.regress(qx, model=REGRESSOR)
    meta_want = forward(model.spec, {k: v[None] for k, v in model.params.items()}, torch.from_numpy(qx)[None])[0]
    np.testing.assert_allclose(meta, meta_want.detach().numpy(), atol=1e-5, rtol=1e-5)
    # more steps from the adaptation = one longer adaptation
    more = kclient.adapt_regressor("", sx, sy, steps=5, from_adaptation_id=adapted.adaptation_id)
    longer = kclient.adapt_regressor(REGRESSOR, sx, sy, steps=10)
    np.testing.assert_allclose(kclient.regress(qx, more.adaptation_id), kclient.regress(qx, longer.adaptation_id),
                               atol=1e-5, rtol=1e-5)


# ---- refusals ---------------------------------------------------------------------------------------------------

def _traj(b=4, h=10, obs_dim=2, act_dim=2, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, h, obs_dim)).astype(np.float32), rng.normal(size=(b, h, act_dim)).astype(np.float32),
            rng.normal(size=(b, h)).astype(np.float32), np.full(b, h))


def _policy_request(obs, act, rew, lengths, **fields):
    fields.setdefault("model", POLICY)
    return pb.AdaptRequest(trajectories=trajectories_message(obs, act, rew, lengths), **fields)


def _bad_policy_requests():
    obs, act, rew, lengths = _traj()
    nan_rew = rew.copy()
    nan_rew[2, 3] = np.nan
    inf_obs = obs.copy()
    inf_obs[1, 0, 1] = np.inf
    u8 = pb.AdaptRequest(model=POLICY, trajectories=pb.Trajectories(
        observations=encode(np.zeros((4, 10, 2), np.uint8)), actions=encode(act), rewards=encode(rew),
        lengths=[10] * 4))
    return {
        "observation size": (_policy_request(obs[..., :1], act, rew, lengths), "trajectories.observations has shape"),
        "actions shape": (_policy_request(obs, act[:, :5], rew, lengths), "trajectories.actions has shape"),
        "action size": (_policy_request(obs, act[..., :1], rew, lengths), "trajectories.actions has shape"),
        "rewards shape": (_policy_request(obs, act, rew[:3], lengths), "trajectories.rewards has shape"),
        "lengths count": (_policy_request(obs, act, rew, lengths[:3]), "trajectories.lengths has 3 values"),
        "zero length": (_policy_request(obs, act, rew, [10, 0, 10, 10]), "trajectories.lengths[1] = 0"),
        "length past H": (_policy_request(obs, act, rew, [10, 10, 11, 10]), "trajectories.lengths[2] = 11"),
        "NaN reward": (_policy_request(obs, act, nan_rew, lengths), "trajectories.rewards holds 1 non-finite"),
        "Inf observation": (_policy_request(inf_obs, act, rew, lengths), "trajectories.observations holds 1 non-fin"),
        "uint8 observations": (u8, "trajectories.observations.dtype is UINT8"),
        "missing trajectories": (pb.AdaptRequest(model=POLICY), "trajectories is missing"),
        "support_y for a policy": (_policy_request(obs, act, rew, lengths, support_y=[0, 1]), "support_y is set"),
        "two steps": (_policy_request(obs, act, rew, lengths, steps=2), "steps = 2, expected 0 or 1"),
        "negative lr": (_policy_request(obs, act, rew, lengths, inner_lr=-1.0), "inner_lr = -1.0"),
        "trajectories for a classifier": (pb.AdaptRequest(model="tiny-5w", trajectories=trajectories_message(
            obs, act, rew, lengths)), "trajectories is set, but model tiny-5w is a classifier"),
        "targets for a classifier": (pb.AdaptRequest(model="tiny-5w", support_targets=encode(np.zeros((5, 1),
                                     np.float32))), "support_targets is set"),
        "labels for a regressor": (pb.AdaptRequest(model=REGRESSOR, support_x=encode(np.zeros((5, 1), np.float32)),
                                                   support_y=[0] * 5), "support_y is set, but model sinusoid-k10"),
        "regressor targets shape": (pb.AdaptRequest(model=REGRESSOR, support_x=encode(np.zeros((5, 1), np.float32)),
                                                    support_targets=encode(np.zeros((4, 1), np.float32))),
                                    "support_targets is FLOAT32 [4, 1], expected FLOAT32 [5, 1]"),
        "regressor NaN target": (pb.AdaptRequest(model=REGRESSOR, support_x=encode(np.zeros((2, 1), np.float32)),
                                                 support_targets=encode(np.array([[0.0], [np.nan]], np.float32))),
                                 "support_targets holds 1 non-finite"),
        "regressor uint8 inputs": (pb.AdaptRequest(model=REGRESSOR, support_x=encode(np.zeros((2, 1), np.uint8)),
                                                   support_targets=encode(np.zeros((2, 1), np.float32))),
                                   "support_x.dtype is UINT8, expected FLOAT32"),
        "regressor missing targets": (pb.AdaptRequest(model=REGRESSOR, support_x=encode(np.zeros((2, 1), np.float32))),
                                      "support_targets is missing"),
    }


BAD = _bad_policy_requests()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapt_requests_are_invalid_argument_naming_the_field(kclient, case):
    request, expected = BAD[case]
    with pytest.raises(grpc.RpcError) as info:
        kclient.stub.Adapt(request, timeout=30)
    assert info.value.code() == INVALID, info.value.details()
    assert expected in info.value.details()
    assert len(info.value.details().encode()) <= MAX_DETAILS_BYTES


def test_bad_predict_and_export_requests(kclient, nav):
    def refused(call, request, expected):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=30)
        assert info.value.code() == INVALID and expected in info.value.details(), info.value.details()

    refused(kclient.stub.Predict, pb.PredictRequest(model=POLICY, query_x=encode(np.zeros((3, 5), np.float32))),
            "query_x has shape [3, 5], expected [Q, 2] observations")
    refused(kclient.stub.Predict, pb.PredictRequest(model=POLICY, query_x=encode(np.array([[np.nan, 0]], np.float32))),
            "query_x holds 1 non-finite")
    refused(kclient.stub.Predict, pb.PredictRequest(model="tiny-5w", query_x=encode(np.zeros((1, 1, 28, 28),
                                                                                              np.uint8))),
            "bn_policy 'support'")
    refused(kclient.stub.Predict, pb.PredictRequest(query_x=encode(np.zeros((1, 2), np.float32))),
            "adaptation_id is empty")
    adapted = send(kclient, POLICY, rollout(nav.spec, nav.params, seed=9))
    refused(kclient.stub.Predict, pb.PredictRequest(adaptation_id=adapted.adaptation_id, model=REGRESSOR,
                                                    query_x=encode(np.zeros((1, 2), np.float32))),
            "is an adaptation of model 'navigation-2d'")
    refused(kclient.stub.ExportAdapted, pb.ExportAdaptedRequest(adaptation_id=adapted.adaptation_id),
            "ONNX export serves classifiers")
    obs, act, rew, lengths = _traj()
    refused(kclient.stub.Adapt, _policy_request(obs, act, rew, lengths, from_adaptation_id=adapted.adaptation_id,
                                                model=REGRESSOR), "is an adaptation of model 'navigation-2d'")
    with pytest.raises(grpc.RpcError) as info:
        kclient.stub.Adapt(_policy_request(obs, act, rew, lengths, from_adaptation_id="ad-" + "0" * 24), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "from_adaptation_id" in info.value.details()



@pytest.mark.gpu
def test_policies_and_regressors_served_on_cuda_equal_the_cpu_references(make_server, kinds_dir, nav):
    server = make_server(model_dir=kinds_dir, device="cuda", backend="auto")
    traj = rollout(nav.spec, nav.params, seed=13)
    want = trainer_step(nav.spec, nav.params, traj, 0.1)
    model = load_checkpoint(ZOO / f"{REGRESSOR}.pt")
    sx, sy, qx, _ = sinusoid_task(1)
    result = maml_adapt(model.spec, model.params, torch.from_numpy(sx)[None], torch.from_numpy(sy)[None], 5,
                        model.spec.inner_lr)
    outputs = forward(model.spec, result.params, torch.from_numpy(qx)[None])[0].detach().numpy()
    with FastAdaptClient(server.address, timeout=120) as client:
        adapted = send(client, POLICY, traj)
        got = served_params(server, adapted.adaptation_id)
        obs = np.array([[0.1, 0.2]], np.float32)
        actions = client.act(obs, adaptation_id=adapted.adaptation_id)
        served = client.regress(qx, client.adapt_regressor(REGRESSOR, sx, sy, steps=5).adaptation_id)
    for name in want:
        torch.testing.assert_close(got[name], want[name][0], atol=1e-4, rtol=1e-4)
    mean, _ = policy_forward(nav.spec, {k: v[0] for k, v in want.items()}, torch.from_numpy(obs))
    np.testing.assert_allclose(actions.mean, mean.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(served, outputs, atol=1e-4, rtol=1e-4)

# ---- the shared store -------------------------------------------------------------------------------------------

def test_a_policy_adaptation_is_served_by_another_replica_through_the_shared_store(make_server, kinds_dir,
                                                                                 redis_server, nav):
    a = make_server(model_dir=kinds_dir, adaptation_store=redis_server.url)
    b = make_server(model_dir=kinds_dir, adaptation_store=redis_server.url)
    obs = np.array([[0.2, 0.1]], dtype=np.float32)
    with FastAdaptClient(a.address, timeout=60) as ca, FastAdaptClient(b.address, timeout=60) as cb:
        adapted = send(ca, POLICY, rollout(nav.spec, nav.params, seed=10))
        assert adapted.shared
        here, there = ca.act(obs, adapted.adaptation_id), cb.act(obs, adapted.adaptation_id)
    np.testing.assert_array_equal(here.mean, there.mean)
    np.testing.assert_array_equal(here.log_std, there.log_std)


# ---- the client demo ---------------------------------------------------------------------------------------------

def test_rl_demo_through_the_wire_equals_the_trainers_evaluation(kserver, tmp_path, capsys):
    """server.rl_demo's returns are the trainer's evaluation's on the same goals and noise."""
    out = tmp_path / "rl-demo"
    assert rl_demo.main(["--address", kserver.address, "--goals", "3", "--trajectories", "4", "--steps", "2",
                         "--plot-goals", "2", "--out", str(out), "--progress", "false"]) == 0
    record = json.loads((out / "rl_demo.json").read_text())
    nav = load_policy(ZOO / f"{POLICY}.pt")
    want = evaluate_policy(Navigation2D(), nav.spec, nav.params, tasks=3, steps=2, trajectories=4)
    assert record["lrs"] == want["lrs"] == [0.1, 0.05]
    assert record["mean"] == pytest.approx(want["mean"], abs=1e-3)
    for got, expected in zip(record["per_goal"], want["per_task"], strict=True):
        assert got == pytest.approx(expected, abs=2e-3)
    assert record["mean"][-1] > record["mean"][0]  # adaptation helps
    assert (out / "rl_demo.png").stat().st_size > 10_000
    md = (out / "rl_demo.md").read_text()
    assert "-40.41" in md and "through the wire" in md
    assert "paper (Finn et al. 2017, MAML)" in capsys.readouterr().out
