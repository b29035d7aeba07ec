"""The DiT worker: takes generation jobs off its queue one at a time, runs them (dit_workers.engine) and records
the result. While a job runs, a thread keeps its heartbeat fresh; each denoising step writes the job's progress
into its RQ meta (one HSET) and the log gets a line every few steps."""

from __future__ import annotations

import logging
import threading
import time

import redis

from broker.errors import BrokerError
from broker.protocol.queues import GENERATE_FUNCTION
from broker.protocol.schemas import GenerateRequest, GenerateResult
from dit_workers.config import DitWorkerConfig
from dit_workers.engine import DitEngine, checksum  # noqa: F401  (checksum: re-exported for callers and tests)
from workers.devices import describe as describe_device
from workers.job_source import TakenJob
from workers.serve_loop import HEARTBEAT_TTL_S, ServeLoop

log = logging.getLogger("dit_workers")


class JobHeartbeat:
    """While a job runs (encode, denoise, decode), a thread keeps its started-registry deadline and the worker's
    heartbeat fresh, so neither a worker's recovery sweep nor the waiting client takes a slow job for a dead one."""

    interval_s = max(1.0, HEARTBEAT_TTL_S / 4)

    def __init__(self, worker: "DitWorker", taken: TakenJob):
        self.worker, self.taken = worker, taken
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{taken.job_id}", daemon=True)

    def _loop(self) -> None:
        w, t = self.worker, self.taken
        while not self._stop.wait(self.interval_s):
            try:
                with w.connection.pipeline(transaction=False) as pipe:
                    w.source.refresh([t], HEARTBEAT_TTL_S, pipe)
                    w.heartbeat(pipe)
                    pipe.execute()
            except redis.RedisError as e:
                log.warning("job %s: heartbeat not written (%s)", t.job_id, e)

    def __enter__(self):
        if self.taken.exec_id:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class StepReporter:
    """`progress(step, steps)` for one job: its RQ meta every step (one HSET), a log line every `every` steps."""

    def __init__(self, worker: "DitWorker", taken: TakenJob, every: int):
        self.worker, self.taken, self.every = worker, taken, every
        self.t_start = time.time()

    def __call__(self, step: int, steps: int) -> None:
        t = self.taken
        now = time.time()
        if step == 0:
            self.t_start = now
        try:
            self.worker.source.write_meta(t, {"progress": {"step": step, "steps": steps}})
        except redis.RedisError as e:  # progress is best effort; the result's write retries the connection
            log.warning("job %s: progress not written (%s)", t.job_id, e)
        every = self.every or max(1, steps // 10)
        if step and (step % every == 0 or step == steps):
            log.info("job %s: step %d/%d (%.0f ms/step)", t.job_id, step, steps, (now - self.t_start) * 1e3 / step)


class DitWorker(ServeLoop):
    def __init__(self, cfg: DitWorkerConfig, device: str, engine: DitEngine | None = None):
        super().__init__(cfg.redis_url, cfg.queue, cfg.max_payload_bytes, function=GENERATE_FUNCTION,
                         parse_request=GenerateRequest.from_msgpack)
        self.cfg = cfg
        self.engine = engine if engine is not None else DitEngine(cfg, device)
        self.device = describe_device(str(self.engine.device))
        self.dtype = str(self.engine.dtype).replace("torch.", "")
        self._encoder_shapes = None

    @property
    def embedder(self):
        return self.engine.embedder

    def describe(self) -> str:
        return f"queue {self.queue!r}, text encoder mode {self.engine.mode!r}, pipeline {self.cfg.model_path}"

    def handle(self, jobs: list[TakenJob]) -> None:
        ready = [t for t in jobs if t.error is None]
        failed = [(t, t.error) for t in jobs if t.error is not None]
        done = []
        for t in ready:
            try:
                with JobHeartbeat(self, t):
                    done.append((t, self.generate(t.request, t).to_msgpack()))
            except BrokerError as e:
                failed.append((t, f"{type(e).__name__}: {e}"))
            except Exception as e:  # one bad job must not stop the worker
                log.exception("job %s failed", t.job_id)
                failed.append((t, f"{type(e).__name__}: {e}"))
        self.source.record(done, failed, result_ttl=self.cfg.result_ttl_s)
        for t, reason in failed:
            log.warning("job %s failed: %s", t.job_id, reason)

    def generate(self, req: GenerateRequest, taken: TakenJob | None = None) -> GenerateResult:
        progress = StepReporter(self, taken, self.cfg.progress_log_every) if taken is not None else None
        res = self.engine.generate(req, progress=progress, name=taken.job_id if taken is not None else None)
        log.info("job %s: %s %dx%d, %d steps, prompt %s, negative %s, encode %.0f ms, denoise %.0f ms",
                 taken.job_id if taken else "-", res.task, res.width, res.height, res.steps,
                 tuple(res.embeds_shapes[0]), tuple(res.embeds_shapes[1]) if len(res.embeds_shapes) > 1 else "-",
                 res.timings["encode_ms"], res.timings["denoise_ms"])
        if req.debug:  # after generate returned, so only what the process keeps is counted
            res.debug = self.census()
        return res

    def census(self) -> dict:
        from dit_workers.census import encoder_census, encoder_param_shapes
        from workers.checkpoint import resolve_checkpoint

        if self._encoder_shapes is None:
            try:
                self._encoder_shapes = encoder_param_shapes(resolve_checkpoint(self.cfg.model_path).text_encoder)
            except Exception as e:  # a DiT-only directory: module classes still tell
                log.warning("encoder weight shapes unknown (%s)", e)
                self._encoder_shapes = set()
        return encoder_census(self._encoder_shapes, self.engine.pipeline_modules())
