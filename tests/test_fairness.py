"""Per-user download slots (proxy.accounts.fairness), without sockets: a slot handed over
outlives its request until released, once."""

from __future__ import annotations

import asyncio

from proxy.accounts.fairness import UserLimits


def test_a_handed_over_slot_is_held_until_released_once() -> None:
    async def scenario() -> None:
        limits = UserLimits(0, max_downloads=1)
        async with limits.download("alice") as slot:
            release = slot.hand_over()
        assert limits.busy("alice") == 1  # the request is done, the slot is not
        waiting = asyncio.ensure_future(_one_download(limits))
        await asyncio.sleep(0)
        assert not waiting.done() and limits.queued == 1
        release()
        release()  # a second call frees nothing more
        await waiting
        assert limits.busy("alice") == 0
        async with limits.download("alice"), limits.download("bob"):
            assert (limits.busy("alice"), limits.busy("bob")) == (1, 1)
        assert limits.queued == 1

    asyncio.run(scenario())


def test_a_slot_not_handed_over_is_freed_with_its_request() -> None:
    async def scenario() -> None:
        limits = UserLimits(0, max_downloads=1)
        async with limits.download("alice"):
            assert limits.busy("alice") == 1
        assert limits.busy("alice") == 0
        unlimited = UserLimits(0, max_downloads=0)
        async with unlimited.download("alice") as slot:
            slot.hand_over()()  # nothing to hold, nothing to free
        assert unlimited.busy("alice") == 0

    asyncio.run(scenario())


async def _one_download(limits: UserLimits) -> None:
    async with limits.download("alice"):
        pass
