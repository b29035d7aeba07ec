"""The compute stage of the encoder worker: runs each ready batch through the encoder (workers.batch_runner) and
hands it to delivery."""

from __future__ import annotations

from workers.batch_runner import Batch, BatchRunner, Encoded
from workers.links import Links


class Compute:
    def __init__(self, runner: BatchRunner, links: Links):
        self.runner = runner
        self.links = links

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
        return self.runner.run(batch)
