"""A background thread that PNG-encodes and writes finished entries into this rank's shards,
so the generator never waits on disk or compression. PNG encoding (which releases the GIL) is
spread over a small thread pool: at 768 px one image takes ~50 ms, so a single thread would
fall behind a fast generator and leave the last batch to drain serially."""

from __future__ import annotations

import json
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bank.store import BankStore, ShardWriter, encode_png


class BackgroundWriter:
    def __init__(self, store: BankStore, group: str, shard_size: int, encoder_info: dict[str, Any], depth: int = 4):
        self.shards = ShardWriter(store, group, shard_size, encoder_info)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="bank-png")
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bank-writer", daemon=True)
        self.thread.start()

    def put(
        self, items: list[tuple[dict[str, Any], np.ndarray | None, np.ndarray | None, dict[str, np.ndarray] | None]]
    ) -> None:
        """items: (meta, image (H, W, 3) uint8 or None if failed, alpha (H, W) uint8 or None, features)."""
        self._raise()
        self.queue.put(items)

    def _run(self) -> None:
        try:
            while (items := self.queue.get()) is not None:
                encoded = list(self.pool.map(self._encode, items))  # order kept: shards are deterministic
                for (meta, image, _, features), files in zip(items, encoded, strict=False):
                    self.shards.add(meta["key"], files, features if image is not None else None)
        except BaseException as err:  # surfaced in the main thread
            self.error = err
            while self.queue.get() is not None:  # drain so the producer never blocks
                pass

    @staticmethod
    def _encode(item) -> dict[str, bytes]:
        meta, image, alpha, _ = item
        files = {"json": json.dumps(meta, sort_keys=True).encode()}
        if image is not None:
            files["png"] = encode_png(image)
            if alpha is not None:
                files["alpha.png"] = encode_png(alpha)
        return files

    def _raise(self) -> None:
        if self.error is not None:
            self.shards.abort()
            raise self.error

    def close(self) -> list[str]:
        """Flushes, commits the last (partial) shard, returns the shards this writer made."""
        self.queue.put(None)
        self.thread.join()
        self.pool.shutdown()
        self._raise()
        self.shards.commit()
        return self.shards.committed
