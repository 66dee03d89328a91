"""The stream batching between the engine replica and the ingress (no Ray, no engine: plain asyncio)."""

import asyncio

import pytest

from lorafleet.serve.deployment import coalesce


async def _source(n: int, log: list, fail_after: int | None = None, delay: float = 0.0):
    try:
        for i in range(n):
            if fail_after is not None and i == fail_after:
                raise ValueError("engine failed")
            await asyncio.sleep(delay)
            log.append(i)
            yield i
    finally:
        log.append("closed")


def test_a_reader_that_keeps_up_gets_every_item_alone_and_in_order():
    async def main():
        log = []
        return [batch async for batch in coalesce(_source(5, log, delay=0.001))], log

    batches, log = asyncio.run(main())
    assert batches == [[0], [1], [2], [3], [4]]
    assert log[-1] == "closed"


def test_a_slow_reader_gets_what_piled_up_in_one_batch_nothing_lost_or_reordered():
    async def main():
        out = []
        async for batch in coalesce(_source(50, [], delay=0)):
            out.append(batch)
            await asyncio.sleep(0.01)  # a busy ingress
        return out

    batches = asyncio.run(main())
    assert [i for b in batches for i in b] == list(range(50))
    assert len(batches) < 10  # piled-up items travel together


def test_an_error_is_raised_after_the_items_before_it():
    async def main():
        got = []
        with pytest.raises(ValueError, match="engine failed"):
            async for batch in coalesce(_source(10, [], fail_after=3)):
                got.extend(batch)
        return got

    assert asyncio.run(main()) == [0, 1, 2]


def test_closing_early_closes_the_source_so_the_engine_aborts():
    async def main():
        log = []
        stream = coalesce(_source(1000, log, delay=0.001))
        await stream.__anext__()
        await stream.aclose()  # what a client disconnect does
        await asyncio.sleep(0.01)
        return log

    log = asyncio.run(main())
    assert log[-1] == "closed"
    assert len(log) < 50
