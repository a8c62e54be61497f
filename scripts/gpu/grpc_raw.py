"""A Generate client for latentserve.v1.Inference that needs only grpcio: the few protobuf fields
it sends and reads are encoded by hand. scripts/gpu-check uses it where the stubs of
tests/python/test_grpc_client.py cannot be built (they need grpcio-tools and protobuf, which a
bare GPU image may lack).

Field numbers from proto/latentserve/v1/inference.proto: GenerateRequest{request_id=1, text=2,
sampling=4, stopping=5}, SamplingParams{optional float temperature=1},
StoppingCriteria{optional uint32 max_tokens=1}, GenerateResponse{text=3}.
"""

from __future__ import annotations

import struct

METHOD = "/latentserve.v1.Inference/Generate"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def encode_generate(request_id: str, text: str, temperature: float, max_tokens: int) -> bytes:
    sampling = _field(1, 5, struct.pack("<f", temperature))  # explicit presence: 0.0 is sent
    stopping = _field(1, 0, _varint(max_tokens))
    return (
        _bytes_field(1, request_id.encode())
        + _bytes_field(2, text.encode())
        + _bytes_field(4, sampling)
        + _bytes_field(5, stopping)
    )


def decode_fields(data: bytes) -> dict[int, list]:
    """Field number -> values (ints for varint/fixed, bytes for length-delimited)."""
    fields: dict[int, list] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value = data[i : i + 8]
            i += 8
        elif wire == 2:
            length = varint()
            value = data[i : i + length]
            i += length
        elif wire == 5:
            value = data[i : i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def response_text(message: bytes) -> str:
    return b"".join(decode_fields(message).get(3, [])).decode("utf-8", errors="replace")


def generate_text(channel, prompt: str, max_tokens: int, timeout: float) -> str:
    call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
    request = encode_generate(prompt, prompt, 0.0, max_tokens)
    return "".join(response_text(message) for message in call(request, timeout=timeout))
