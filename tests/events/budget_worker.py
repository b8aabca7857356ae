"""A second gateway process for the shared-budget test (run as a script, not collected).

    python budget_worker.py NATS_URL DATA_DIR TENANT COUNT AMOUNT LIMIT

Starts the events layer on NATS_URL, prints "ready", waits for a start time (unix seconds) on stdin,
makes COUNT concurrent reservations and prints the granted ones as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from tollway.config import EventsConfig, NatsConfig
from tollway.events.budget import Reservation
from tollway.events.service import EventsService


async def main(url: str, data_dir: str, tenant: str, count: int, amount: int,
               limit: int) -> None:
    svc = EventsService(NatsConfig(url=url, data_dir=data_dir), EventsConfig(),
                        instance="worker")
    await svc.start()
    assert svc.runner is not None
    await svc.runner.catch_up(10)
    print("ready", flush=True)
    go_at = float(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
    await asyncio.sleep(max(0.0, go_at - time.time()))  # both processes start together
    async def one(i: int) -> Reservation | None:
        await asyncio.sleep(i * 0.005)  # spread over ~200 ms: the two processes interleave
        return await svc.budget.reserve(tenant, amount, limit, request_id=f"w-{i}")

    results = await asyncio.gather(*(one(i) for i in range(count)))
    granted = [r.request_id for r in results if r is not None]
    print(json.dumps({"granted": granted}), flush=True)
    await svc.stop()


if __name__ == "__main__":
    u, d, t, c, a, lim = sys.argv[1:7]
    asyncio.run(main(u, d, t, int(c), int(a), int(lim)))
