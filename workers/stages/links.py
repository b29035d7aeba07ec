"""Everything the encoder worker's stage threads share with each other: the queues between its stages, the events
they signal with, and the two pieces of state two stages touch (the pixel budget; the encoding cache with its
lock). Beyond these, threads share services that lock for themselves (the Redis connection pool through
workers.job_source, the outage log of workers.outage, the tally of workers.stats), the encoder split in halves that
share no mutable state (intake uses the tokenizing half, compute the forward half), and the result writer's counts,
which the metrics thread reads as they are (docs/ARCHITECTURE.md draws them all).

    intake --ready--> compute --done--> delivery
    intake, delivery --held--> housekeeping (heartbeats the jobs it is told are held)
    intake --pixels--> compute (decoded image pixels: intake reserves them before decoding, compute releases them)
    compute <--cache--> delivery (compute looks sequences up, delivery keeps new ones: under cache_lock)
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from workers.encoding_cache import EncodingCache
from workers.pixel_budget import PixelBudget

# Longest intake and delivery hold back, per job, while compute launches kernels (Links.launched): a bound, in case
# a launch phase includes waiting for the device.
LAUNCH_WAIT_S = 0.05


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass(slots=True)
class Links:
    # intake -> compute: the next batch (workers.stages.types.JobBatch), exactly one formed ahead while the device
    # runs the current one (TEI's prefetch); None once intake has stopped.
    ready: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=1))
    # compute -> delivery: computed batches (workers.stages.types.Encoded); None once compute has stopped.
    done: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=2))
    # intake, delivery -> housekeeping: ("hold", jobs) once taken, ("release", jobs) once recorded or given up
    # on (then, should the record have failed, recovery retries them once their heartbeat lapses).
    held: queue.Queue = field(default_factory=queue.Queue)
    # Set while compute waits for a batch: intake then closes a batch at once rather than let it grow.
    device_idle: threading.Event = field(default_factory=_set_event)
    # Clear while compute launches a batch's kernels on a GPU. Every torch call lets go of the GIL and must take
    # it back; if intake and delivery run Python then, the launches fall behind the device (RESULTS.md,
    # load benchmark run 7). They wait on it before each job's Python work, and do that work while compute waits
    # for the device, GIL released.
    launched: threading.Event = field(default_factory=_set_event)
    stopping: threading.Event = field(default_factory=threading.Event)  # a signal came: intake takes no more jobs
    finished: threading.Event = field(default_factory=threading.Event)  # delivery is done: housekeeping ends
    # Decoded image pixels held from decode (intake) to the end of their batch's compute: max_image_pixels_in_flight.
    pixels: PixelBudget = field(kw_only=True)
    # Recent encodings (cache_max_bytes): compute looks a batch's sequences up before running them; delivery keeps
    # a batch's new states once their copies to the host have landed, which only delivery waits for (so the device
    # starts the next batch meanwhile). Both hold cache_lock while they touch it; no other thread does.
    cache: EncodingCache = field(kw_only=True)
    cache_lock: threading.Lock = field(default_factory=threading.Lock)
