"""Concurrent clients storing random patterns into one bank until told to stop, keeping what the
server acknowledged: the load a fault test kills something under."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np

MAX_BATCHES = 100_000  # per client: a bound should stop() never come

class Writers:
    """`clients` threads, each storing batches of `batch` random `dim`-vectors into `bank` at `url`.

    `acknowledged` holds every (ids, vectors) answered 200, `statuses` the status of every answer and
    `retry_after` the Retry-After header of every refusal (None where it had none); a request that got
    no answer (the server is gone) is in none of them."""

    def __init__(self, url: str, bank: str, dim: int, *, clients: int, batch: int = 1, timeout: float = 15.0):
        self.url, self.bank, self.dim, self.batch, self.timeout = url, bank, dim, batch, timeout
        self.acknowledged: list[tuple[list[str], list[list[float]]]] = []
        self.statuses: list[int] = []
        self.retry_after: list[str | None] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write, args=(client,)) for client in range(clients)]

    @property
    def acknowledged_ids(self) -> list[str]:
        return [pid for ids, _ in self.acknowledged for pid in ids]

    def start(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _write(self, client: int) -> None:
        rng = np.random.default_rng(client)
        with httpx.Client(base_url=self.url, timeout=self.timeout) as http:
            for number in range(MAX_BATCHES):
                if self._stop.is_set():
                    return
                ids = [f"w{client}-{number}-{k}" for k in range(self.batch)]
                vectors = rng.standard_normal((self.batch, self.dim)).astype(np.float32).tolist()
                try:
                    answer = http.post(f"/v1/banks/{self.bank}/store", json={"patterns": vectors, "ids": ids})
                except httpx.HTTPError:
                    time.sleep(0.05)  # no answer: the server is down
                    continue
                self.statuses.append(answer.status_code)
                if answer.status_code == 200:
                    self.acknowledged.append((ids, vectors))
                else:
                    self.retry_after.append(answer.headers.get("Retry-After"))
                    time.sleep(0.05)  # refused: do not spin on a server that is recovering

    def __enter__(self) -> Writers:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
