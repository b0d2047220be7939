"""``events.stream()``: the team's lifecycle events over SSE, parsed by the
SDK into ``SSEEvent`` (any unknown event name or bad field would raise
inside the SDK's generator and end the stream with an error)."""

from __future__ import annotations

import asyncio

import pytest
from wrenn import (
    AsyncWrennClient,
    WrennAuthenticationError,
    WrennClient,
    WrennNotFoundError,
    WrennValidationError,
)
from wrenn.models import SSEEvent, Status
from wrennsdk_support import Collector, poll


def _find(events, kind: str, capsule_id: str):
    return next(
        (e for e in events if e.event == kind and e.resource is not None and e.resource.id == capsule_id),
        None,
    )


def _check_action(ev: SSEEvent, capsule_id: str) -> None:
    assert ev.outcome == "success", ev
    assert ev.resource is not None and ev.resource.id == capsule_id and ev.resource.type == "sandbox"
    assert ev.timestamp is not None and ev.timestamp.tzinfo is not None
    assert ev.actor is not None and ev.actor.type == "api_key", ev.actor
    assert ev.error is None
    assert ev.sandbox is None or ev.sandbox.id == capsule_id


def test_stream_sees_lifecycle(server, client: WrennClient) -> None:
    listener = WrennClient(api_key=server.api_key, base_url=server.base_url)
    col = Collector(listener.events.stream, name="sse")
    try:
        first = col.wait_for(lambda items: items and items[0], 10, "the connected frame")
        assert isinstance(first, SSEEvent)
        assert first.event in (None, "connected")

        m = client.capsules.create(template="minimal")
        cid = m.id
        poll(lambda: client.capsules.get(cid).status == Status.running, 30, 0.2, "running")
        client.capsules.pause(cid)
        col.wait_for(lambda items: _find(items, "capsule.pause", cid), 30, "capsule.pause")
        poll(lambda: client.capsules.get(cid).status == Status.paused, 30, 0.2, "paused")
        client.capsules.resume(cid)
        col.wait_for(lambda items: _find(items, "capsule.resume", cid), 30, "capsule.resume")
        client.capsules.destroy(cid)
        col.wait_for(lambda items: _find(items, "capsule.destroy", cid), 30, "capsule.destroy")

        events = list(col.items)
        assert col.error is None, col.error
        for kind in ("capsule.create", "capsule.pause", "capsule.resume", "capsule.destroy"):
            ev = _find(events, kind, cid)
            assert ev is not None, f"no {kind} for {cid}"
            _check_action(ev, cid)
        kinds = [e.event for e in events if e.resource is not None and e.resource.id == cid]
        firsts = [kinds.index(k) for k in
                  ("capsule.create", "capsule.pause", "capsule.resume", "capsule.destroy")]
        assert firsts == sorted(firsts), f"events out of order: {kinds}"
        created = _find(events, "capsule.create", cid)
        assert created.sandbox is None or created.sandbox.template == "minimal"
        for e in events:
            if e.event == "capsule.state.changed":
                assert e.outcome is None and e.metadata and "from" in e.metadata and "to" in e.metadata
    finally:
        listener.close()


def test_failed_create_is_not_a_success_event(server, client: WrennClient) -> None:
    """Requests the API rejects up front publish nothing for a capsule:
    an unknown template, and sizes an agent would refuse (refused before a
    row is written, or it would be left in ``error`` with a failed
    ``capsule.create``)."""
    listener = WrennClient(api_key=server.api_key, base_url=server.base_url)
    col = Collector(listener.events.stream, name="sse-fail")
    try:
        col.wait_for(lambda items: items, 10, "the connected frame")
        with pytest.raises(WrennNotFoundError):
            client.capsules.create(template="no-such-template-xyz")
        for refused in ({"memory_mb": 16}, {"timeout_sec": 10**9}):
            with pytest.raises(WrennValidationError):
                client.capsules.create(template="minimal", **refused)
        m = client.capsules.create(template="minimal")
        client.capsules.destroy(m.id)
        col.wait_for(lambda items: _find(items, "capsule.destroy", m.id), 30, "capsule.destroy")
        creates = [e for e in col.items if e.event == "capsule.create"]
        assert [e.resource.id for e in creates if e.resource] == [m.id]
        assert col.error is None, col.error
    finally:
        listener.close()


def test_stream_bad_key(server) -> None:
    with WrennClient(api_key="wrn_" + "0" * 32, base_url=server.base_url) as bad:
        with pytest.raises(WrennAuthenticationError):
            next(iter(bad.events.stream()))


async def test_async_stream(server, async_client: AsyncWrennClient) -> None:
    listener = AsyncWrennClient(api_key=server.api_key, base_url=server.base_url)
    seen: list[SSEEvent] = []

    async def listen() -> None:
        async for ev in listener.events.stream():
            seen.append(ev)

    task = asyncio.create_task(listen())
    try:
        async with asyncio.timeout(10):
            while not seen:
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        m = await async_client.capsules.create(template="minimal")
        await async_client.capsules.destroy(m.id)
        async with asyncio.timeout(30):
            while not _find(seen, "capsule.destroy", m.id):
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        _check_action(_find(seen, "capsule.create", m.id), m.id)
        _check_action(_find(seen, "capsule.destroy", m.id), m.id)
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await listener.aclose()
