"""The HTTP front's settings: a JSON file (--config), then EB_<KEY> variables, then flags (broker.http.front.main)."""

from __future__ import annotations

from dataclasses import dataclass

from broker.protocol.config import DEFAULT_REDIS_URL, from_json_file
from broker.protocol.queues import DEFAULT_QUEUE
from shm.names import check_prefix

SHM_DEFAULTS = ("off", "shm", "both")


@dataclass(slots=True)
class HttpFrontConfig:
    host: str = "127.0.0.1"
    port: int = 8010
    redis_url: str = DEFAULT_REDIS_URL
    queue: str = DEFAULT_QUEUE
    timeout: float = 30.0  # seconds per request, end to end (queueing + encoding)
    retries: int = 3  # re-runs of a job whose worker died; Redis connection retries
    max_body_bytes: int = 16 << 20
    max_inflight: int = 256  # /generate requests held at once; past it: 429
    max_queue_depth: int = 0  # queue length past which new jobs are refused (429); 0: the workers' bound
    client_timeout_s: float = 10.0  # a request's head, and then its body, must arrive within this long
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this long
    shutdown_grace_s: float = 10.0  # on SIGTERM/SIGINT, requests in flight get this long to finish
    shm_default: str = "off"  # when a request doesn't set parameters.use_shm (LightX2V never does): off | shm | both
    shm_ttl_s: float = 10.0  # an answer's segment is unlinked this long after it is written
    shm_prefix: str = "eb"  # of the front's answer segments
    worker_shm_prefix: str | None = None  # the encoder workers' shm_prefix (None: $EB_SHM_PREFIX, else "eb")
    shm_max_bytes: int = 256 << 20  # the front's live answer segments; past it answers go as base64 (0: no shm)
    sweep_interval_s: float = 1.0
    worker_stale_s: float = 15.0  # a worker whose RQ heartbeat is older than this does not count as serving
    log_level: str = "INFO"

    def __post_init__(self):
        if self.shm_default not in SHM_DEFAULTS:
            raise ValueError(f"shm_default must be one of {', '.join(SHM_DEFAULTS)}, not {self.shm_default!r}")
        for name in ("max_body_bytes", "max_inflight", "timeout", "shm_ttl_s", "sweep_interval_s",
                     "client_timeout_s", "keep_alive_s", "worker_stale_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if min(self.max_queue_depth, self.retries, self.shm_max_bytes, self.shutdown_grace_s) < 0 \
                or not 0 <= self.port < 65536:
            raise ValueError("max_queue_depth, retries, shm_max_bytes and shutdown_grace_s must be >= 0, "
                             "port in [0, 65535]")
        check_prefix(self.shm_prefix)
        if self.worker_shm_prefix is not None:
            check_prefix(self.worker_shm_prefix)

    @classmethod
    def load(cls, path: str | None = None, **overrides) -> "HttpFrontConfig":
        """From `path` (or defaults), then EB_<KEY> environment variables, then the non-None `overrides`."""
        return from_json_file(cls, path, **overrides)
