"""One generation, without Redis: check the request, get [prompt, negative] embeddings in one call, run the
Qwen-Image pipeline on them, return the PNG. The DiT worker (dit_workers.worker) wraps it in the queue loop;
tests and benchmarks call it directly."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass

import torch

from broker.errors import InvalidRequest
from broker.protocol.schemas import GenerateRequest, GenerateResult
from dit_workers import pipeline as P
from dit_workers.config import DitWorkerConfig
from dit_workers.embeddings import make_embedder

log = logging.getLogger("dit_workers")


def checksum(tensors: list[torch.Tensor]) -> float:
    return float(sum(t.double().abs().sum().item() for t in tensors))


@dataclass(slots=True)
class Prepared:
    """A request made ready to run: the pipeline, the keywords it is called with, the embeddings they hold."""

    task: str
    pipe: object
    kwargs: dict
    states: list  # [prompt] or [prompt, negative]: [L_i, D] each, as the encoder returned them
    steps: int
    encode_ms: float
    seed: int = 0
    true_cfg_scale: float = 0.0


class DitEngine:
    def __init__(self, cfg: DitWorkerConfig, device: str | torch.device):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = P.resolve_dtype(cfg.dtype, self.device)
        t0 = time.time()
        self.t2i = P.load_t2i(cfg.model_path, self.device, self.dtype)
        self._i2i = None
        self.unit = P.size_unit(self.t2i)
        self.text_dim = self.t2i.transformer.config.joint_attention_dim
        self.embedder = make_embedder(cfg, str(self.device))
        log.info("pipeline from %s on %s (%s), size unit %d, text encoder %s%s; loaded in %.1fs", cfg.model_path,
                 self.device, str(self.dtype).replace("torch.", ""), self.unit, self.embedder.mode,
                 f" ({cfg.quantization})" if cfg.quantization else "", time.time() - t0)

    @property
    def mode(self) -> str:
        return self.embedder.mode

    def i2i(self):
        if self._i2i is None:  # built on the first i2i job: a separate Edit checkpoint is large
            self._i2i = P.load_i2i(self.cfg.edit_model_path, self.t2i, self.device, self.dtype)
        return self._i2i

    def pipeline_modules(self) -> list:
        pipes = [self.t2i] + ([self._i2i] if self._i2i is not None else [])
        return [m for p in pipes for m in (p.transformer, p.vae)]

    # -- checking --------------------------------------------------------------------------------------
    def resolve_size(self, req: GenerateRequest, images: list | None = None) -> tuple[int, int]:
        """The request's size, or the configured default for t2i; i2i without a size takes the last input image's
        aspect at about i2i_resolution^2 pixels (1024: what QwenImageEditPlusPipeline itself picks)."""
        width, height = req.width, req.height
        if req.task == "t2i":
            width = width or self.cfg.default_width or self.t2i.default_sample_size * self.t2i.vae_scale_factor
            height = height or self.cfg.default_height or self.t2i.default_sample_size * self.t2i.vae_scale_factor
        elif images and not (width and height):
            side = self.cfg.i2i_resolution
            w, h = P.calculate_dimensions(side * side, images[-1].size[0] / images[-1].size[1])
            width = width or max(self.unit, w // self.unit * self.unit)  # floored to the unit, as the pipeline does
            height = height or max(self.unit, h // self.unit * self.unit)
        for name, v in (("width", width), ("height", height)):
            if v is None:
                continue
            if v % self.unit:
                lo = max(self.unit, v // self.unit * self.unit)
                raise InvalidRequest(f"{name} {v} is not a multiple of {self.unit} (this pipeline's unit: VAE scale "
                                     f"factor {self.unit // 2} x 2x2 latent patches); try {lo} or {lo + self.unit}")
            if v > self.cfg.max_side:
                raise InvalidRequest(f"{name} {v} is over max_side {self.cfg.max_side}")
        return width, height

    def resolve_steps(self, req: GenerateRequest) -> int:
        steps = self.cfg.default_steps if req.steps is None else req.steps
        if steps < 1:  # validate() refuses 0 already; a broken invariant if it got here
            raise InvalidRequest(f"steps must be at least 1, got {steps}")
        if steps > self.cfg.max_steps:
            raise InvalidRequest(f"steps {steps} is over max_steps {self.cfg.max_steps}")
        return steps

    def check_states(self, states: list[torch.Tensor], want: int) -> None:
        if len(states) != want or any(s.dim() != 2 for s in states):
            raise RuntimeError(f"the encoder returned {[tuple(s.shape) for s in states]}, not {want} [L, D] tensors")
        for s in states:
            if s.shape[1] != self.text_dim:
                raise RuntimeError(f"the encoder's hidden size {s.shape[1]} is not this DiT's joint_attention_dim "
                                   f"{self.text_dim}: the encoder serves a different model than {self.cfg.model_path}")

    # -- running ---------------------------------------------------------------------------------------
    def prepare(self, req: GenerateRequest) -> Prepared:
        """What the pipeline will be called with. A request that leaves out its size, steps, seed, guidance or
        negative prompt gets the worker's defaults (default_* in its config: LightX2V's keys land there)."""
        req.validate()
        self.output_folder(req)  # a bad output_dir fails before any work is done
        steps = self.resolve_steps(req)
        images, cond_png = None, []
        pipe = self.t2i
        if req.task == "i2i":
            if len(req.images) > self.cfg.max_images:
                raise InvalidRequest(f"{len(req.images)} images, over max_images {self.cfg.max_images}")
            images = P.decode_images(req.images, self.cfg.max_input_pixels)
        width, height = self.resolve_size(req, images)
        if images is not None:
            pipe = self.i2i()
            cond_png = [P.png_bytes(im) for im in P.condition_images(pipe, images)]
        cfg = self.cfg
        seed = cfg.default_seed if req.seed is None else req.seed
        scale = cfg.default_true_cfg_scale if req.true_cfg_scale is None else req.true_cfg_scale
        negative = cfg.default_negative_prompt if req.negative_prompt is None else req.negative_prompt
        prompts = [req.prompt, negative] if scale > 1 else [req.prompt]
        t0 = time.time()
        states = self.embedder.embed(prompts, req.task, cond_png)
        encode_ms = (time.time() - t0) * 1e3
        self.check_states(states, len(prompts))
        kwargs = P.call_kwargs(states, dtype=self.dtype, device=self.device, width=width, height=height, steps=steps,
                               seed=seed, true_cfg_scale=scale, images=images)
        return Prepared(req.task, pipe, kwargs, states, steps, encode_ms, seed, float(scale))

    def run(self, prep: Prepared, progress=None):
        """Runs the pipeline; `progress(step, steps)` after each denoising step (and with 0 before the first)."""
        def on_step_end(pipe, i, t, tensors):
            if progress is not None:
                progress(i + 1, prep.steps)
            return {}

        if progress is not None:
            progress(0, prep.steps)
        with torch.inference_mode():
            out = prep.pipe(**prep.kwargs, callback_on_step_end=on_step_end)
        return out.images[0]

    def generate(self, req: GenerateRequest, progress=None, name: str | None = None) -> GenerateResult:
        t0 = time.time()
        prep = self.prepare(req)
        t1 = time.time()
        image = self.run(prep, progress)
        t2 = time.time()
        png = P.png_bytes(image)
        path = self.write_png(req, png, name) if (req.output_dir or req.return_path) else ""
        t3 = time.time()
        return GenerateResult(
            embeds_shapes=[list(s.shape) for s in prep.states], embeds_checksum=checksum(prep.states),
            encoder_mode=self.mode, png=b"" if path else png, path=path, width=image.size[0],
            height=image.size[1], task=req.task, steps=prep.steps, seed=prep.seed,
            true_cfg_scale=prep.true_cfg_scale,
            timings={"encode_ms": round(prep.encode_ms, 3), "denoise_ms": round((t2 - t1) * 1e3, 3),
                     "png_ms": round((t3 - t2) * 1e3, 3), "total_ms": round((t3 - t0) * 1e3, 3)})

    def output_folder(self, req: GenerateRequest) -> str:
        """The request's `output_dir` is a folder under the worker's own output_dir: clients choose where
        inside it, never a path elsewhere on the worker's host."""
        root = os.path.realpath(self.cfg.output_dir)
        if not req.output_dir:
            return root
        if os.path.isabs(req.output_dir):
            raise InvalidRequest(f"output_dir must be a folder relative to the worker's output_dir, "
                                 f"got the absolute path {req.output_dir!r}")
        folder = os.path.realpath(os.path.join(root, req.output_dir))
        if folder != root and not folder.startswith(root + os.sep):
            raise InvalidRequest(f"output_dir {req.output_dir!r} leaves the worker's output_dir")
        return folder

    def write_png(self, req: GenerateRequest, png: bytes, name: str | None) -> str:
        folder = self.output_folder(req)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name or uuid.uuid4().hex}.png")
        fd, tmp = tempfile.mkstemp(prefix=".png-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(png)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)  # readers never see a half-written file
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path
