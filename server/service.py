"""The FastAdapt servicer: validate and decode each request, queue it on the batcher, cache and answer.

client -> service (validate, decode) -> batcher (coalesce tasks) -> runner/engine (adapt, predict) -> cache -> reply.
No model math here: the runner calls the Engine on the worker thread.
"""

from __future__ import annotations

import json
import time

import numpy as np

from models.checkpoint import MetaModel
from server import validation
from server.batcher import Batched, DynamicBatcher
from server.cache import Adaptation, AdaptationCache
from server.registry import ModelRegistry, parameter_count, provenance_summary
from server.runner import AdaptJob, AdaptOutcome, BatchRunner, PredictJob
from server.status import InvalidArgument
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
    ):
        self.registry, self.batcher, self.runner = registry, batcher, runner
        self.cache, self.metrics, self.limits = cache, metrics, limits

    # ---- RPCs -------------------------------------------------------------------------------------------------
    async def Adapt(self, request, context):
        start = time.perf_counter()
        validation.check_request_size(request, "Adapt", self.limits)
        job = self._adapt_job(request, "")
        batched = await self.batcher.submit(job.key, job)
        response, _ = self._adapt_response(job, batched, start)
        return response

    async def Predict(self, request, context):
        start = time.perf_counter()
        validation.check_request_size(request, "Predict", self.limits)
        entry = self.cache.get(validation.adaptation_id(request))
        model = self.registry.get(entry.model)
        query = validation.images(request, "query_x", "query_x", model, "Q", self.limits.max_queries)
        job = PredictJob(model, entry.params, entry.support_x, query)
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
        model = self.registry.get(request.adapt.model, "adapt.model")
        query = validation.images(request, "query_x", "query_x", model, "Q", self.limits.max_queries)
        job = self._adapt_job(request.adapt, "adapt.", query=query, keep=not request.skip_cache)
        batched = await self.batcher.submit(job.key, job)
        adapted, timings = self._adapt_response(job, batched, start)
        return pb.AdaptAndPredictResponse(adapt=adapted, predict=self._predict_response(batched.result.logits, timings))

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[self._model_info(m) for m in self.registry])

    async def GetModel(self, request, context):
        return pb.GetModelResponse(model=self._model_info(self.registry.get(request.model)))

    async def ExportAdapted(self, request, context):
        adaptation_id = validation.adaptation_id(request)
        entry = self.cache.get(adaptation_id)
        model = self.registry.get(entry.model)
        metadata = {
            "fastadapt.adaptation_id": adaptation_id,
            "fastadapt.steps": str(entry.steps),
            "fastadapt.inner_lr": "learned (Meta-SGD)" if entry.inner_lr == 0 else f"{entry.inner_lr:g}",
            "fastadapt.provenance": json.dumps(provenance_summary(model.provenance), sort_keys=True),
        }
        data = await self.batcher.run_exclusive(self.runner.export, model, entry.params, entry.support_x, metadata)
        return pb.ExportAdaptedResponse(
            onnx_model=data, input_name="x", output_name="logits", preprocessing=model.spec.preprocessing
        )

    async def Release(self, request, context):
        freed = self.cache.release(validation.adaptation_id(request))
        return pb.ReleaseResponse(freed_bytes=freed)

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _adapt_job(self, request, path: str, query=None, keep: bool = True) -> AdaptJob:
        model = self.registry.get(request.model, f"{path}model")
        support_x, support_y = validation.support_set(request, path, model, self.limits)
        steps = validation.steps(request, path, model, self.limits)
        lr = validation.inner_lr(request, path, model)
        return AdaptJob(model, support_x, support_y, steps, lr, query, keep)

    def _adapt_response(self, job: AdaptJob, batched: Batched, start: float) -> tuple[pb.AdaptResponse, pb.Timings]:
        out: AdaptOutcome = batched.result
        model = job.model
        lr_used = job.lr if job.lr is not None else (0.0 if model.inner_lrs is not None else model.spec.inner_lr)
        adaptation_id, nbytes = "", 0
        if job.keep:
            entry = Adaptation(model.name, out.params, out.support_x, job.steps, lr_used)
            adaptation_id, nbytes = self.cache.put(entry), entry.nbytes
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
            adaptation_id=adaptation_id,
            model=model.name,
            steps=job.steps,
            inner_lr=lr_used,
            support_loss=out.support_loss.tolist(),
            support_accuracy=out.support_accuracy.tolist(),
            timings=timings,
            adaptation_bytes=nbytes,
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
        spec = model.spec
        return pb.ModelInfo(
            name=spec.name,
            arch=spec.arch,
            ways=spec.ways,
            input_shape=list(spec.input_shape),
            input_dtype=pb.UINT8,
            accepted_dtypes=IMAGE_DTYPES,
            default_steps=spec.steps,
            default_inner_lr=spec.inner_lr,
            learned_inner_lr=model.inner_lrs is not None,
            bn_policy=spec.bn_policy,
            preprocessing=spec.preprocessing,
            provenance=provenance_summary(model.provenance),
            provenance_json=json.dumps(model.provenance, sort_keys=True, default=str),
            num_params=parameter_count(model),
            max_steps=self.limits.max_steps,
            max_support=self.limits.max_support,
            max_queries=self.limits.max_queries,
        )
