"""The compute stage of the encoder worker: runs each ready batch through the encoder (workers.batch_runner) and
hands it to delivery. Once a batch is computed its jobs' decoded images are let go of, and their pixels given
back to the worker's budget (workers.pixel_budget), whatever happened to it."""

from __future__ import annotations

import dataclasses

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
        try:
            return self.runner.run(batch)
        finally:
            self.let_go_of_images(batch)

    def let_go_of_images(self, batch: Batch) -> None:
        """Drops the jobs' decoded images (delivery needs only their token ids) and releases their pixels."""
        pixels = 0
        for p in batch.jobs:
            if p.tokens.images is not None:
                p.tokens = dataclasses.replace(p.tokens, images=None)
            pixels, p.pixels = pixels + p.pixels, 0
        if pixels:
            self.links.pixels.release(pixels)
