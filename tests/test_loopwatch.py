import time

import trio

from pqmsg.loopwatch import StepTimer
from pqmsg.protocol import crypto
from pqmsg.routes.common import VERIFY_BATCH, verify_all


def hold_the_loop(seconds: float) -> None:
    """Blocking on purpose: what the timer must catch."""
    time.sleep(seconds)


async def test_counts_a_step_that_holds_the_loop() -> None:
    timer = StepTimer(slow_step_s=0.010)
    trio.lowlevel.add_instrument(timer)
    try:

        async def blocker() -> None:
            hold_the_loop(0.03)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocker, name="blocker")
            nursery.start_soon(trio.sleep, 0)
    finally:
        trio.lowlevel.remove_instrument(timer)
    stats = timer.statistics()
    assert stats.slow_steps == 1
    assert stats.max_step_s >= 0.03
    assert stats.max_step_task == "blocker"


async def test_signature_batches_yield_to_the_loop() -> None:
    """100 verifications are spread over at least 100 / VERIFY_BATCH steps."""
    key = crypto.generate_signing_key()
    sig = crypto.sign(key.secret_key, b"m")
    timer = StepTimer()
    trio.lowlevel.add_instrument(timer)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(verify_all, [(key.public_key, b"m", sig)] * 100, name="verifier")
    finally:
        trio.lowlevel.remove_instrument(timer)
    assert timer.statistics().steps >= 100 // VERIFY_BATCH


async def test_a_hundred_key_upload_is_parsed_over_several_steps() -> None:
    from pqmsg.client.keys import Identity
    from pqmsg.client.session import Device
    from pqmsg.routes.keys import PARSE_BATCH, parse_upload, parse_upload_yielding

    body = Device(None, "a", 1, crypto.generate_signing_key(), Identity()).prekey_body(ec=100, pq=100)  # type: ignore[arg-type]
    timer = StepTimer()
    parsed: list[object] = []

    async def parse() -> None:
        parsed.append(await parse_upload_yielding(body, 100))

    trio.lowlevel.add_instrument(timer)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(parse, name="parser")
    finally:
        trio.lowlevel.remove_instrument(timer)
    assert parsed == [parse_upload(body, 100)]
    assert timer.statistics().steps >= 200 // PARSE_BATCH
