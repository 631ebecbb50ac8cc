"""The FastAdapt servicer: validate and decode each request, queue it on the batcher, cache and answer.

client -> service (validate, decode) -> batcher (coalesce tasks) -> runner/engine (adapt, predict) -> cache -> reply.
No model math here: the runner calls the Engine on the worker thread.
"""

from __future__ import annotations

import json
import time

import numpy as np

from models.checkpoint import MetaModel
from server import kinds, validation
from server.batcher import Batched, DynamicBatcher
from server.cache import Adaptation, AdaptationCache
from server.registry import ModelRegistry, parameter_count, provenance_summary
from server.runner import AdaptJob, AdaptOutcome, BatchRunner, PredictJob
from server.status import InvalidArgument
from server.store import Kept, LocalAdaptations
from server.telemetry import ServerMetrics
from server.validation import Limits
from server.wire import encode, pb, pb_grpc

IMAGE_DTYPES = [pb.UINT8, pb.FLOAT16, pb.FLOAT32]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


class FastAdaptService(pb_grpc.FastAdaptServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        batcher: DynamicBatcher,
        runner: BatchRunner,
        cache: AdaptationCache,
        metrics: ServerMetrics,
        limits: Limits,
        store=None,
    ):
        self.registry, self.batcher, self.runner = registry, batcher, runner
        self.cache, self.metrics, self.limits = cache, metrics, limits
        # where adaptations live: the cache alone, or a shared store behind it as a near cache (server/store.py)
        self.store = store if store is not None else LocalAdaptations(cache)

    # ---- RPCs -------------------------------------------------------------------------------------------------
    async def Adapt(self, request, context):
        start = time.perf_counter()
        validation.check_request_size(request, "Adapt", self.limits)
        if kinds.routes_elsewhere(self.registry, request, ""):  # regressors, policies, from_adaptation_id
            job = await kinds.adapt_job(self, request, "")
        else:
            job = self._adapt_job(request, "")
        batched = await self.batcher.submit(job.key, job)
        response, _ = await self._adapt_response(job, batched, start)
        return response

    async def Predict(self, request, context):
        start = time.perf_counter()
        validation.check_request_size(request, "Predict", self.limits)
        entry, model = await kinds.predict_target(self, request)  # entry None: the model's meta-initialization
        if entry is None or kinds.model_kind(model) != "classifier":
            return await kinds.predict(self, request, model, entry, start)
        query = validation.images(request, "query_x", "query_x", model, "Q", self.limits.max_queries)
        validation.kernel_rows(model, self.runner.max_rows(model), **validation.query_rows(model, query.shape[0]))
        job = PredictJob(model, entry.params, entry.stats, query)
        batched = await self.batcher.submit(job.key, job)
        timings = pb.Timings(
            queue_ms=batched.queue_s * 1e3,
            predict_ms=batched.result.predict_s * 1e3,
            total_ms=(time.perf_counter() - start) * 1e3,
            batch_tasks=batched.batch_size,
        )
        return self._predict_response(batched.result.logits, timings)

    async def AdaptAndPredict(self, request, context):
        start = time.perf_counter()
        validation.check_request_size(request, "AdaptAndPredict", self.limits)
        if not request.HasField("adapt"):
            raise InvalidArgument("adapt is missing, expected an AdaptRequest (model, support_x, support_y, ...)")
        if kinds.routes_elsewhere(self.registry, request.adapt, "adapt."):
            return await kinds.adapt_and_predict(self, request, start)
        model = self.registry.get(request.adapt.model, "adapt.model")
        query = validation.images(request, "query_x", "query_x", model, "Q", self.limits.max_queries)
        job = self._adapt_job(request.adapt, "adapt.", query=query, keep=not request.skip_cache)
        validation.kernel_rows(model, self.runner.max_rows(model),
                               **validation.support_rows(model, "adapt.", job.support_x.shape[0]),
                               **validation.query_rows(model, query.shape[0]))
        batched = await self.batcher.submit(job.key, job)
        adapted, timings = await self._adapt_response(job, batched, start)
        return pb.AdaptAndPredictResponse(adapt=adapted, predict=self._predict_response(batched.result.logits, timings))

    async def ListModels(self, request, context):
        broken = [pb.ModelInfo(name=name, ready=False, not_ready_reason=why)
                  for name, why in self.registry.not_ready.items()]
        return pb.ListModelsResponse(models=[self._model_info(m) for m in self.registry] + broken)

    async def GetModel(self, request, context):
        if request.model in self.registry.not_ready:
            return pb.GetModelResponse(model=pb.ModelInfo(name=request.model, ready=False,
                                                          not_ready_reason=self.registry.not_ready[request.model]))
        return pb.GetModelResponse(model=self._model_info(self.registry.get(request.model)))

    async def ExportAdapted(self, request, context):
        adaptation_id = validation.adaptation_id(request)
        entry = await self.store.get(adaptation_id)
        model = self.registry.get(entry.model)
        kinds.check_exportable(model)
        metadata = {
            "fastadapt.adaptation_id": adaptation_id,
            "fastadapt.steps": str(entry.steps),
            "fastadapt.inner_lr": "learned (Meta-SGD)" if entry.inner_lr == 0 else f"{entry.inner_lr:g}",
            "fastadapt.provenance": json.dumps(provenance_summary(model.provenance), sort_keys=True),
        }
        data = await self.batcher.run_exclusive(self.runner.export, model, entry.params, entry.stats, metadata)
        return pb.ExportAdaptedResponse(
            onnx_model=data, input_name="x", output_name="logits", preprocessing=model.spec.preprocessing
        )

    async def Release(self, request, context):
        freed = await self.store.release(validation.adaptation_id(request))
        return pb.ReleaseResponse(freed_bytes=freed)

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _adapt_job(self, request, path: str, query=None, keep: bool = True) -> AdaptJob:
        model = self.registry.get(request.model, f"{path}model")
        support_x, support_y = validation.support_set(request, path, model, self.limits)
        steps = validation.steps(request, path, model, self.limits, support_x.shape[0])
        if query is None:
            validation.kernel_rows(model, self.runner.max_rows(model),
                                   **validation.support_rows(model, path, support_x.shape[0]))
        lr = validation.inner_lr(request, path, model)
        return AdaptJob(model, support_x, support_y, steps, lr, query, keep)

    async def _adapt_response(self, job: AdaptJob, batched: Batched, start: float) -> tuple[pb.AdaptResponse,
                                                                                          pb.Timings]:
        out: AdaptOutcome = batched.result
        model = job.model
        lr_used = model.reported_lr(job.lr)
        kept = Kept("", 0, shared=False)
        if job.keep:
            kept = await self.store.put(Adaptation(model.name, out.params, out.stats, job.steps + job.prior_steps,
                                                   lr_used), model.spec)
        self.metrics.task_steps.inc(job.steps)
        if out.adapt_s > 0:
            self.metrics.steps_per_second.set(batched.batch_size * job.steps / out.adapt_s)
        timings = pb.Timings(
            queue_ms=batched.queue_s * 1e3,
            adapt_ms=out.adapt_s * 1e3,
            predict_ms=out.predict_s * 1e3,
            total_ms=(time.perf_counter() - start) * 1e3,
            batch_tasks=batched.batch_size,
        )
        response = pb.AdaptResponse(
            adaptation_id=kept.adaptation_id,
            model=model.name,
            steps=job.steps,
            inner_lr=lr_used,
            support_loss=out.support_loss.tolist(),
            support_accuracy=out.support_accuracy.tolist(),
            timings=timings,
            adaptation_bytes=kept.nbytes,
            shared=kept.shared,
            store_warning=kept.warning,
        )
        return response, timings

    @staticmethod
    def _predict_response(logits: np.ndarray, timings: pb.Timings) -> pb.PredictResponse:
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        return pb.PredictResponse(
            logits=encode(logits),
            labels=logits.argmax(axis=-1).tolist(),
            timings=timings,
            probabilities=encode(softmax(logits)),
        )

    def _model_info(self, model: MetaModel) -> pb.ModelInfo:
        if kinds.model_kind(model) == "policy":
            return kinds.policy_info(model, self.limits, provenance_summary(model.provenance),
                                     json.dumps(model.provenance, sort_keys=True, default=str), parameter_count(model))
        spec = model.spec
        info = pb.ModelInfo(
            name=spec.name,
            arch=spec.arch,
            ways=spec.ways,
            input_shape=list(spec.input_shape),
            input_dtype=pb.UINT8,
            accepted_dtypes=IMAGE_DTYPES,
            default_steps=spec.steps,
            default_inner_lr=spec.inner_lr,
            learned_inner_lr=model.has_learned_lr,
            bn_policy=spec.bn_policy,
            preprocessing=spec.preprocessing,
            provenance=provenance_summary(model.provenance),
            provenance_json=json.dumps(model.provenance, sort_keys=True, default=str),
            num_params=parameter_count(model),
            max_steps=self.limits.max_steps,
            max_support=self.limits.max_support,
            max_queries=self.limits.max_queries,
            ready=True,
            recipe=str(model.provenance.get("recipe") or (model.provenance.get("config") or {}).get("recipe")
                       or (model.provenance.get("config") or {}).get("algorithm") or "maml"),
            adapt_params=spec.adapt_params,
            head_init=spec.head_init,
            support_views=spec.support_views,
            query_views=spec.query_views,
            per_step_bn_steps=model.bn_steps or 0,
            max_support_steps=self.limits.max_support_steps,
        )
        return kinds.describe(model, info)
