"""The compute stage of the encoder worker: runs each ready batch through the encoder (workers.batch_runner) and
hands it to delivery; the batch's result segments are reserved while the device computes it."""

from __future__ import annotations

import logging

import torch

from workers.batch_runner import Batch, BatchRunner, Encoded
from workers.links import Links
from workers.result_writer import ResultWriter, layout_of

log = logging.getLogger("workers")


class Compute:
    def __init__(self, runner: BatchRunner, writer: ResultWriter, links: Links):
        self.runner = runner
        self.writer = writer
        self.links = links
        self._itemsize = torch.empty((), dtype=runner.encoder.dtype).element_size()

    def run(self) -> None:
        """The compute thread (the worker's main thread): batches from `links.ready` to `links.done`."""
        while True:
            self.links.device_idle.set()
            batch = self.links.ready.get()
            if batch is None:
                break
            self.links.device_idle.clear()
            self.links.done.put(self.compute(batch))
        self.links.done.put(None)

    def compute(self, batch: Batch) -> Encoded:
        return self.runner.run(batch, while_device_runs=lambda: self.reserve_segments(batch))

    def reserve_segments(self, batch: Batch) -> None:
        """Creates the batch's shared-memory result segments while the device computes it, their memory
        allocation then off the results' path (RESULTS.md run 13). The output sizes are known from the token
        counts; a result of another size gets a segment of its own at delivery."""
        try:
            for p in batch.jobs:
                if self.writer.goes_by_shm(p.taken.request):
                    shapes = [[n, self.runner.encoder.hidden_size] for n in p.tokens.output_lengths]
                    nbytes = layout_of(shapes, self._itemsize)[2]
                    name = self.writer.reserve(p.taken.job_id, nbytes)
                    if name is not None:
                        p.reserved = (name, nbytes)
        except Exception:  # only a head start: delivery writes segments of its own without it
            log.exception("reserving result segments failed")
