"""python -m dit_workers.demo --config CONFIG: submit a few prompts to the DiT workers, show their progress, write
the PNGs to var/images/ and print their paths and sizes, next to the embedding shapes the in-process encoder gives
for the same prompts. Then an i2i edit of the first image, if the encoder takes images. Then waits (honcho keeps
running)."""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import sys
import time

from broker.errors import BrokerUnavailable, EncodeFailed
from broker.generation import GenerationClient
from dit_workers.config import DitWorkerConfig

DEMO_PROMPTS = [
    "a red fox in snow",
    "A cozy reading nook by a rain-streaked window, warm lamp light, a cat asleep on a knitted blanket",
    "neon sign that says 'encoder-broker' 🦊",
]
EDIT_PROMPT = "make the sky purple"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "image"


def save_png(png: bytes, out_dir: str, name: str) -> tuple[str, tuple[int, int]]:
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.png")
    with open(path, "wb") as f:
        f.write(png)
    with Image.open(io.BytesIO(png)) as img:
        return path, img.size


def show_progress(label: str):
    def on_progress(p: dict) -> None:
        print(f"demo: {label}: step {p.get('step')}/{p.get('steps')}", flush=True)
    return on_progress


def run_t2i(client: GenerationClient, args) -> list | None:
    for attempt in range(240):  # workers may still be loading: keep asking for up to two minutes
        try:
            jobs = [client.submit(p, negative_prompt=" ", width=args.width, height=args.height, steps=args.steps,
                                  seed=i) for i, p in enumerate(DEMO_PROMPTS)]
            return [client.wait(*job, on_progress=show_progress(f"{p[:24]!r}")) for job, p in zip(jobs, DEMO_PROMPTS)]
        except BrokerUnavailable as e:
            print(f"demo: waiting for the services ({e})", flush=True)
            time.sleep(0.5)
    return None


def run_i2i(client: GenerationClient, image_png: bytes, args) -> None:
    try:
        res = client.generate(EDIT_PROMPT, task="i2i", images=[image_png], width=args.width, height=args.height,
                              steps=args.steps, on_progress=show_progress("i2i"))
    except EncodeFailed as e:
        print(f"demo: i2i skipped: the encoder does not take images yet ({e})", flush=True)
        return
    path, size = save_png(res.png, args.out, slug("edit " + EDIT_PROMPT))
    print(f"demo: i2i {EDIT_PROMPT!r}: {path} {size[0]}x{size[1]}", flush=True)


def main(argv=None, prog: str = "python -m dit_workers.demo") -> int:
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--config", required=True)
    ap.add_argument("--once", action="store_true", help="exit after printing instead of waiting")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(REPO, "var", "images"), help="where the PNGs go")
    args = ap.parse_args(argv)
    cfg = DitWorkerConfig.from_json(args.config)
    client = GenerationClient(cfg.redis_url, queue=cfg.queue, timeout=600)
    results = run_t2i(client, args)
    if results is None:
        print("demo: gave up", flush=True)
        return 1

    from dit_workers.engine import checksum
    from workers.encoders import load_encoder

    reference = load_encoder(cfg.model_path, backend="baseline")
    ok = True
    for prompt, res in zip(DEMO_PROMPTS, results):
        states = reference.encode([prompt, " "])
        want, want_sum = [list(t.shape) for t in states], checksum(states)
        # values: the sum of |state| over both prompts, within 1% (a GPU worker computes in bfloat16)
        match = want == res.embeds_shapes and abs(res.embeds_checksum - want_sum) <= 0.01 * want_sum
        ok &= match
        path, size = save_png(res.png, args.out, slug(prompt))
        print(f"demo: {prompt[:50]!r}: {path} {size[0]}x{size[1]}, {res.steps} steps, prompt {res.embeds_shapes[0]}, "
              f"negative {res.embeds_shapes[1]}, checksum {res.embeds_checksum:.3f}, encoder {res.encoder_mode}, "
              f"in-process shapes and values {'match' if match else f'DIFFER: {want}, checksum {want_sum:.3f}'}, "
              f"encode {res.timings.get('encode_ms', 0):.0f} ms, denoise {res.timings.get('denoise_ms', 0):.0f} ms",
              flush=True)
    print(f"demo: {'all shapes and values match the in-process encoder' if ok else 'MISMATCH'}", flush=True)
    run_i2i(client, results[0].png, args)
    print(f"demo: done ({'ok' if ok else 'MISMATCH'}){'' if args.once else '; Ctrl-C stops every process'}",
          flush=True)
    if not args.once:
        signal.pause()  # honcho stops every process when one exits: stay up until stopped
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
