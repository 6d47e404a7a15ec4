"""Chunked transfers: out-of-order and duplicate chunks, checksums, limits, schema versions."""

import random

import pytest

from edge_client.framing import (
    ProtocolError,
    Reassembler,
    chunk_transfer,
    decode_json,
    encode_json,
    parse_chunk,
)


def chunks(data, transfer="t1", device="d", chunk_bytes=4096):
    return list(chunk_transfer(data, kind="update", run="r", round_idx=2, device=device, transfer=transfer,
                               meta={"update_id": transfer}, chunk_bytes=chunk_bytes))


def test_out_of_order_and_duplicate_chunks_reassemble_exactly_once():
    data = random.Random(0).randbytes(50_000)
    cs = chunks(data)
    shuffled = cs + cs[:3]  # three duplicates
    random.Random(1).shuffle(shuffled)
    r = Reassembler(1 << 20)
    done = [t for c in shuffled if (t := r.add(c)) is not None]
    assert len(done) == 1 and done[0].data == data and done[0].meta == {"update_id": "t1"}


def test_a_transfer_sent_again_whole_completes_again_for_the_receiver_to_dedupe():
    data = b"x" * 10_000
    r = Reassembler(1 << 20)
    assert [t for c in chunks(data) if (t := r.add(c))][0].data == data
    assert [t for c in chunks(data) if (t := r.add(c))][0].data == data
    r.add(chunks(data)[1])  # a stray re-delivered chunk is dropped quietly at the deadline
    assert r.drop_incomplete() == []


def test_missing_chunk_is_never_a_partial_transfer():
    r = Reassembler(1 << 20)
    cs = chunks(b"y" * 20_000)
    assert all(r.add(c) is None for c in cs[:-1])
    assert r.drop_incomplete() == [("d", "t1")]


def test_limits_checksums_and_schema():
    big = chunks(b"z" * 10_000)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        Reassembler(5_000).add(big[0])  # refused at the first chunk, before buffering
    with pytest.raises(ProtocolError, match="truncated"):
        parse_chunk(big[0][:6])
    bad = bytearray(big[-1])
    bad[-1] ^= 0xFF
    r = Reassembler(1 << 20)
    for c in big[:-1]:
        r.add(c)
    with pytest.raises(ProtocolError, match="checksum"):
        r.add(bytes(bad))
    with pytest.raises(ProtocolError, match="unsupported schema version 2.0"):
        decode_json(b'{"schema": "2.0", "type": "ack"}')
    assert decode_json(encode_json({"type": "ack"}))["schema"] == "1.0"
    with pytest.raises(ProtocolError, match="came on the topic of"):
        Reassembler(1 << 20).add(big[0], device_from_topic="someone-else")
