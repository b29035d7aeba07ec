"""The batching policy, pure: which sequences run together. No I/O, no model; unit-tested on its own."""

from __future__ import annotations


def unique_sequences(seqs: list[tuple]) -> tuple[list[tuple], list[int]]:
    """Identical token sequences in a batch are computed once: (unique ones, index into them per input)."""
    first: dict[tuple, int] = {}
    index = []
    for s in seqs:
        index.append(first.setdefault(s, len(first)))
    return list(first), index


def split_by_tokens(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Consecutive groups of sequence indices, each at most `max_batch_tokens` long in total.
    A single sequence longer than the budget gets a group of its own (it must run somewhere)."""
    groups, cur, cur_tokens = [], [], 0
    for i, n in enumerate(lengths):
        if cur and cur_tokens + n > max_batch_tokens:
            groups.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += n
    if cur:
        groups.append(cur)
    return groups


class BatchPolicy:
    """When a forming batch closes: at `max_batch_requests` jobs, at `max_batch_tokens` tokens, or, while the
    device is idle, once `max_wait_ms` passed since its first job. The wait is paid only while more jobs are
    expected (jobs have been arriving closer together than the window): a lone request runs at once. While
    the device is busy a batch keeps growing (up to the limits): waiting costs nothing then, and a bigger batch
    uses the device better."""

    def __init__(self, max_batch_tokens: int = 16384, max_batch_requests: int = 64, max_wait_ms: float = 2.0):
        assert max_batch_tokens > 0 and max_batch_requests > 0 and max_wait_ms >= 0
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.max_wait_ms = max_wait_ms
        self.gap_ms: float | None = None  # moving average of the time between job arrivals
        self._last_arrival: float | None = None

    def arrived(self, at_s: float) -> None:
        """Records a job's arrival (its enqueue time, seconds)."""
        if self._last_arrival is not None:
            gap = max(0.0, (at_s - self._last_arrival) * 1e3)
            self.gap_ms = gap if self.gap_ms is None else 0.8 * self.gap_ms + 0.2 * gap
        self._last_arrival = max(at_s, self._last_arrival or at_s)

    def expect_more(self) -> bool:
        return self.gap_ms is not None and self.gap_ms < self.max_wait_ms

    def fits(self, n_requests: int, n_tokens: int, job_tokens: int) -> bool:
        """Can a job of `job_tokens` join a batch holding `n_requests` jobs and `n_tokens` tokens?
        An empty batch takes any job, however long (it must run somewhere)."""
        if n_requests == 0:
            return True
        return n_requests < self.max_batch_requests and n_tokens + job_tokens <= self.max_batch_tokens

    def full(self, n_requests: int, n_tokens: int) -> bool:
        return n_requests >= self.max_batch_requests or n_tokens >= self.max_batch_tokens

    def should_close(self, n_requests: int, n_tokens: int, waited_ms: float, device_idle: bool) -> bool:
        if n_requests == 0:
            return False
        if self.full(n_requests, n_tokens):
            return True
        if not device_idle:
            return False
        return waited_ms >= self.max_wait_ms or not self.expect_more()

    def wait_left_ms(self, waited_ms: float) -> float:
        return max(0.0, self.max_wait_ms - waited_ms)
