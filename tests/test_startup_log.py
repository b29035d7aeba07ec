"""What a user reads when an encoder worker starts: our own log lines only (no library progress bars, no
transformers warnings about the checkpoint's config), one of them saying the dtype it computes in, which
`broker stats` shows too."""

import re
import uuid

import redis

from broker.ops.stats import collect, format_stats
from tests.helpers import start_worker, stop_process, wait_for_workers

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [\w.]+ (INFO|WARNING|ERROR) ")


def test_encoder_worker_start_up_log_is_ours_and_names_its_dtype(tiny_dir, redis_server, tmp_path):
    queue = "log-" + uuid.uuid4().hex[:6]
    proc, log = start_worker(tmp_path, "encoder", env={"EB_DTYPE": "bfloat16"}, model_dir=tiny_dir,
                             make_tiny_if_missing=False, backend="baseline", device="cpu",
                             redis_url=redis_server.url, queue=queue)
    try:
        wait_for_workers(redis_server.url, 1, proc, log, queue=queue)
        text = open(log).read()
        assert all(LOG_LINE.match(line) for line in text.splitlines()), text
        assert "rope" not in text and "Loading" not in text, text
        (serving,) = [line for line in text.splitlines() if " serving queue " in line]
        assert serving.endswith("with the baseline encoder on cpu, bfloat16, not quantized"), serving

        s = collect(redis.Redis.from_url(redis_server.url), queue)
        assert [(w["device"], w["dtype"], w["quantization"]) for w in s["workers"]] == [("cpu", "bfloat16", "")]
        assert f"pid {s['workers'][0]['pid']} on cpu, bfloat16  " in format_stats(s)
    finally:
        stop_process(proc)
