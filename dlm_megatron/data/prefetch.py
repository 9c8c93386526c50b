"""Read and noise the next steps' batches in a background thread while a step runs.

A step's batches are a pure function of the step number (trainer.step_batches: sample
order, shard reads, noise from (seed, position)), so producing them ahead changes nothing
but when the work happens: resume, DP changes and every layout see the same batches.
A thread is enough: shard reads (memory maps, page faults) and the torch ops that noise a
batch release the GIL, and the training step itself runs in torch's C++ kernels.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable


class Prefetcher:
    """``produce(step)`` for steps start, start+1, ..., stop-1, at most ``depth`` steps
    ahead of the consumer, in one daemon thread; ``get(step)`` returns them in order.
    ``depth`` 0 produces in the caller's thread instead (no background work at all).
    An exception in ``produce`` is raised by the ``get`` of that step."""

    def __init__(self, produce: Callable[[int], Any], start: int, stop: int, depth: int):
        self.produce, self.next_step, self.depth = produce, start, depth
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth > 0 and start < stop:
            self._thread = threading.Thread(target=self._run, args=(start, stop), name="dlm-prefetch", daemon=True)
            self._thread.start()

    def _run(self, start: int, stop: int) -> None:
        for step in range(start, stop):
            try:
                item = (step, self.produce(step), None)
            except BaseException as exc:  # handed to the consumer, which raises it
                item = (step, None, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def get(self, step: int):
        """The batches of ``step``, which must be the next one in order."""
        if step != self.next_step:
            raise RuntimeError(f"prefetcher asked for step {step}, next is {self.next_step}")
        self.next_step += 1
        if self._thread is None:
            return self.produce(step)
        got, value, exc = self._queue.get()
        assert got == step, (got, step)
        if exc is not None:
            raise exc
        return value

    def close(self) -> None:
        """Stop producing (the thread exits at its next step or queue wait)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
