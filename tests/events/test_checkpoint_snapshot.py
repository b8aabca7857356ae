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


async def test_two_gateways_saving_at_once_leave_a_loadable_checkpoint(nc: NatsClient) -> None:
    """Workers of one fleet checkpoint the same projection: the one that loses the
    manifest's compare-and-set must not delete the chunks of the one that won."""
    kv = await nc.jetstream().key_value("tollway_checkpoints")
    events = list(synthetic.events(2000))
    first, second = usage_projection(), usage_projection()
    for seq, e in enumerate(events, 1):
        first.apply(seq, e)
        if seq <= len(events) - 100:
            second.apply(seq, e)
    assert await checkpoint.save(kv, second)  # a manifest both read before they write
    for seq, e in enumerate(events[-100:], len(events) - 99):
        second.apply(seq, e)
    for _ in range(5):  # each round: both start from the same manifest
        first.view.last_seq += 1
        second.view.last_seq += 1
        saved = await asyncio.gather(checkpoint.save(kv, first), checkpoint.save(kv, second))
        assert saved.count(True) == 1, saved
        again = usage_projection()
        manifest = await checkpoint.load(kv, again)
        assert manifest is not None, "the winner's checkpoint is whole"
        assert usage.dump(again.view) == usage.dump(first.view)
