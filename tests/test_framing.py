"""Chunked transfers: out-of-order and duplicate chunks, checksums, limits, memory caps, schema versions."""

import itertools
import json
import random

import pytest

from fedlora_edge.core.framing import (
    ProtocolError,
    Reassembler,
    chunk_transfer,
    decode_json,
    encode_json,
    parse_chunk,
)

_ctr = itertools.count(1)


def chunks(data, transfer="t1", device="d", chunk_bytes=4096):
    return [parse_chunk(b) for b in chunk_transfer(data, kind="update", run="r", nonce="n", round_idx=2, device=device,
                                                   transfer=transfer, meta={"update_id": transfer},
                                                   next_ctr=lambda: next(_ctr), chunk_bytes=chunk_bytes)]


def test_out_of_order_and_duplicate_chunks_reassemble_exactly_once():
    data = random.Random(0).randbytes(50_000)
    cs = chunks(data)
    shuffled = cs + cs[:3]  # three duplicates
    random.Random(1).shuffle(shuffled)
    r = Reassembler(1 << 20)
    done = [t for h, b in shuffled if (t := r.add(h, b)) is not None]
    assert len(done) == 1 and done[0].data == data and done[0].meta == {"update_id": "t1"}
    assert r.buffered == 0


def test_a_transfer_sent_again_whole_completes_again_for_the_receiver_to_dedupe():
    data = b"x" * 10_000
    r = Reassembler(1 << 20)
    assert [t for h, b in chunks(data) if (t := r.add(h, b))][0].data == data
    assert [t for h, b in chunks(data) if (t := r.add(h, b))][0].data == data
    r.add(*chunks(data)[1])  # a stray re-delivered chunk is dropped quietly at the deadline
    assert r.drop_incomplete() == []


def test_missing_chunk_is_never_a_partial_transfer():
    r = Reassembler(1 << 20)
    cs = chunks(b"y" * 20_000)
    assert all(r.add(h, b) is None for h, b in cs[:-1])
    assert r.drop_incomplete() == [("d", "t1")]
    assert r.buffered == 0


def test_limits_checksums_and_schema():
    big = chunks(b"z" * 10_000)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        Reassembler(5_000).add(*big[0])  # refused at the first chunk, before buffering
    with pytest.raises(ProtocolError, match="exceeds the limit of 6000"):
        Reassembler(1 << 20).add(*big[0], limit=6000)  # the per-transfer limit (the device's plan)
    raw = next(chunk_transfer(b"z", kind="update", run="r", nonce="n", round_idx=2, device="d", transfer="t",
                              meta={}, next_ctr=lambda: 1))
    with pytest.raises(ProtocolError, match="truncated"):
        parse_chunk(raw[:6])
    h, b = big[-1]
    r = Reassembler(1 << 20)
    for hh, bb in big[:-1]:
        r.add(hh, bb)
    with pytest.raises(ProtocolError, match="checksum"):
        r.add(h, b[:-1] + bytes([b[-1] ^ 0xFF]))
    with pytest.raises(ProtocolError, match="unsupported schema version 1.0"):
        decode_json(b'{"schema": "1.0", "type": "ack"}')
    with pytest.raises(ProtocolError, match="not a JSON message"):
        decode_json(b'{"schema": "2.0", "loss": NaN}')  # JSON has no NaN: refused, never aggregated
    assert decode_json(encode_json({"type": "ack"}))["schema"] == "2.0"


def test_one_sender_cannot_hold_more_than_its_share_of_memory():
    r = Reassembler(1 << 20, max_open=2)
    for t in ("a", "b", "c"):  # a third transfer of one sender evicts its oldest incomplete one
        r.add(*chunks(b"q" * 20_000, transfer=t)[0])
    assert r.evicted == 1 and r.buffered == 2 * 4096
    r.add(*chunks(b"q" * 20_000, transfer="x", device="other")[0])  # another sender is not touched
    assert r.evicted == 1 and r.peak_buffered == 3 * 4096
    good = chunks(b"g" * 9000, transfer="good")
    done = [t for h, b in good if (t := r.add(h, b))]
    assert done and done[0].data == b"g" * 9000  # after junk, a good transfer always gets through


def test_chunks_adding_up_to_more_than_the_transfer_are_dropped():
    h, b = chunks(b"w" * 5000)[0]
    r = Reassembler(1 << 20)
    r.add(h, b)
    liar = dict(h, seq=1)
    with pytest.raises(ProtocolError, match="add up to more"):
        r.add(liar, b"w" * 4096)
    assert r.buffered == 0


@pytest.mark.parametrize("field,value", [("seq", -1), ("total", 0), ("nbytes", "10"), ("round", True),
                                         ("sha256", "ab"), ("type", "ack"), ("meta", None), ("nonce", 5)])
def test_malformed_headers_are_refused_with_the_field_named(field, value):
    raw = next(chunk_transfer(b"abc", kind="update", run="r", nonce="n", round_idx=1, device="d", transfer="t",
                              meta={}, next_ctr=lambda: 1))
    n = int.from_bytes(raw[:4], "big")
    header = json.loads(raw[4:4 + n])
    header[field] = value
    h = json.dumps(header).encode()
    with pytest.raises(ProtocolError):
        parse_chunk(len(h).to_bytes(4, "big") + h + raw[4 + n:])
