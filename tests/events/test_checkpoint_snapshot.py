"""A checkpoint is the view as it was when the save began, while the view folds on."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NatsClient

from tollway.events import synthetic
from tollway.events.projections import checkpoint, usage, usage_projection


async def test_a_checkpoint_is_the_view_when_the_save_began(nc: NatsClient) -> None:
    kv = await nc.jetstream().key_value("tollway_checkpoints")
    events = list(synthetic.events(4000))
    proj = usage_projection()
    half = len(events) // 2
    for seq, e in enumerate(events[:half], 1):
        proj.apply(seq, e)
    want = usage.dump(proj.view)
    save = asyncio.create_task(checkpoint.save(kv, proj))
    await asyncio.sleep(0)  # the save has taken its snapshot and waits on the bucket
    for seq, e in enumerate(events[half:], half + 1):  # requests go on: the view moves
        proj.apply(seq, e)
    assert await save
    again = usage_projection()
    manifest = await checkpoint.load(kv, again)
    assert manifest is not None and manifest.seq == half
    assert usage.dump(again.view) == want != usage.dump(proj.view)
