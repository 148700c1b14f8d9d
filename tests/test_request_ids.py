"""Generated request ids: 24 hex digits, random (not counted), never repeated
by a forked child; a safe client id is echoed, an unsafe one replaced."""

from __future__ import annotations

import os
import re

from pqmsg.http.edge import request_id_for

HEX24 = re.compile(r"[0-9a-f]{24}")


def test_made_ids_are_24_hex_digits_and_unique_across_blocks() -> None:
    ids = [request_id_for({}) for _ in range(5000)]  # several blocks of 1,024
    assert all(HEX24.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_made_ids_are_not_a_counter() -> None:
    # Consecutive ids share no prefix beyond chance (a counter would share 12+ digits).
    first, second = request_id_for({}), request_id_for({})
    assert first[:12] != second[:12]


def test_a_safe_client_id_is_echoed_and_an_unsafe_one_replaced() -> None:
    assert request_id_for({"headers": [(b"x-request-id", b"client-id.0001")]}) == "client-id.0001"
    made = request_id_for({"headers": [(b"x-request-id", b"bad id\n")]})
    assert HEX24.fullmatch(made)


def test_a_forked_child_does_not_reuse_its_parents_ids() -> None:
    request_id_for({})  # the parent holds a partly used block
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.write(write, "".join(request_id_for({}) for _ in range(50)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    child = {text[i : i + 24] for i in range(0, len(text), 24)}
    parent = {request_id_for({}) for _ in range(50)}
    assert len(child) == 50 and not child & parent
