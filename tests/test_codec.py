"""Wire codec: tensors and chunked payloads must survive a roundtrip, and malformed input must be
rejected with InvalidArgument (never a crash or a silently wrong array)."""
from __future__ import annotations

import numpy as np
import pytest

from hmi_client.v1 import tensor_pb2
from services.common.codec import decode_tensor, encode_tensor, join_chunks, split_chunks, validate_offsets
from services.common.errors import InvalidArgument

# ---- tensors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "float32", "int32", "int64"])
@pytest.mark.parametrize("shape", [(0,), (7,), (3, 5), (2, 3, 4)])
def test_roundtrip_preserves_dtype_shape_and_values(dtype, shape):
    """Every wire dtype comes back bit-identical, with its shape."""
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 1000).astype(dtype)
    message = encode_tensor(array)
    assert message.dtype == dtype
    assert list(message.shape) == list(shape)
    decoded = decode_tensor(message)
    assert decoded.dtype == np.dtype(dtype)
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)


def test_roundtrip_of_non_contiguous_and_big_endian_input():
    """Strided views and big-endian arrays are normalised to contiguous little-endian on the wire."""
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = base[:, ::2]
    np.testing.assert_array_equal(decode_tensor(encode_tensor(view)), view)
    big = np.arange(5, dtype=">i4")
    message = encode_tensor(big)
    assert message.data == np.arange(5, dtype="<i4").tobytes()
    np.testing.assert_array_equal(decode_tensor(message), big)


def test_encode_rejects_dtype_not_on_the_wire():
    with pytest.raises(InvalidArgument, match="float64"):
        encode_tensor(np.zeros(3, dtype=np.float64))


def test_decode_passes_expected_dtype_and_ndim():
    """The expect_* checks accept a matching tensor."""
    array = np.ones((2, 3), dtype=np.int32)
    decoded = decode_tensor(encode_tensor(array), expect_dtype="int32", expect_ndim=2)
    np.testing.assert_array_equal(decoded, array)


def _message(dtype="float32", shape=(2, 2), nbytes=16):
    return tensor_pb2.Tensor(dtype=dtype, shape=list(shape), data=b"\0" * nbytes)


@pytest.mark.parametrize("message, kwargs, pattern", [
    (_message(dtype="float64"), {}, "unknown dtype"),
    (_message(dtype="bfloat16"), {}, "unknown dtype"),
    (_message(dtype=""), {}, "unknown dtype"),
    (_message(nbytes=15), {}, "needs 16 bytes, got 15"),
    (_message(nbytes=17), {}, "needs 16 bytes, got 17"),
    (_message(shape=(2, 3)), {}, "needs 24 bytes"),
    (_message(shape=(-2, -2), nbytes=16), {}, "negative dimension"),
    (_message(shape=(-1,), nbytes=0), {}, "negative dimension"),
    (_message(), {"expect_dtype": "int32"}, "dtype must be int32"),
    (_message(), {"expect_ndim": 1}, "expected 1 dimensions"),
    (_message(shape=(16,), nbytes=64), {"expect_ndim": 2}, "expected 2 dimensions"),
], ids=["float64", "bfloat16", "empty-dtype", "short-data", "long-data", "shape-mismatch",
        "negative-dims-product-positive", "negative-dim", "wrong-dtype", "wrong-ndim-2v1", "wrong-ndim-1v2"])
def test_decode_rejects_malformed_tensor(message, kwargs, pattern):
    with pytest.raises(InvalidArgument, match=pattern):
        decode_tensor(message, **kwargs)


def test_decode_error_names_the_field():
    """Errors say which request field was wrong."""
    with pytest.raises(InvalidArgument, match="^token_ids:"):
        decode_tensor(_message(nbytes=3), field="token_ids")


# ---- chunks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("length, size", [(0, 4), (1, 4), (4, 4), (10, 4), (4096, 1000), (10, 100)])
def test_split_join_roundtrip(length, size):
    payload = bytes(np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8))
    chunks = list(split_chunks(payload, size))
    assert all(len(chunk) <= size for chunk in chunks)
    assert all(len(chunk) == size for chunk in chunks[:-1])
    assert len(chunks) == -(-length // size)
    assert join_chunks(chunks) == payload


def test_split_accepts_memoryview():
    payload = bytes(range(200))
    chunks = list(split_chunks(memoryview(payload), 64))
    assert all(isinstance(chunk, bytes) for chunk in chunks)
    assert b"".join(chunks) == payload


def test_join_limit_allows_exactly_the_limit():
    assert join_chunks([b"abc", b"de"], limit=5) == b"abcde"


def test_join_limit_rejects_more_than_the_limit():
    """A client streaming more than allowed is stopped as soon as the limit is crossed."""
    consumed = []

    def chunks():
        for chunk in (b"abc", b"def", b"ghi"):
            consumed.append(chunk)
            yield chunk

    with pytest.raises(InvalidArgument, match="limit of 5 bytes"):
        join_chunks(chunks(), limit=5)
    assert consumed == [b"abc", b"def"]  # did not read the rest of the stream


# ---- offsets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("offsets, total", [([0, 5], 5), ([0, 1, 2, 3], 3), ([0, 2, 7, 10], 10)])
def test_validate_offsets_accepts_good_offsets(offsets, total):
    result = validate_offsets(offsets, total)
    assert result.dtype == np.int64
    np.testing.assert_array_equal(result, offsets)


@pytest.mark.parametrize("offsets, total, pattern", [
    ([], 0, "at least 2 offsets"),
    ([0], 0, "at least 2 offsets"),
    ([1, 5], 5, "start at 0"),
    ([0, 4], 5, "end at the token count 5"),
    ([0, 6], 5, "end at the token count 5"),
    ([0, 2, 2, 5], 5, "at least one token"),
    ([0, 0], 0, "at least one token"),
    ([0, 3, 2, 5], 5, "at least one token"),
], ids=["none", "one", "not-from-0", "short-end", "past-end", "empty-sequence", "all-empty", "decreasing"])
def test_validate_offsets_rejects_bad_offsets(offsets, total, pattern):
    with pytest.raises(InvalidArgument, match=pattern):
        validate_offsets(offsets, total)
