"""How requests come off the wire: method handlers whose deserializers never raise.

grpc's generated registration parses each request with `FromString`; a protobuf DecodeError
there (invalid UTF-8 in a string field, a truncated message) ends the call with UNKNOWN before
any handler runs, outside the error map, unlogged and uncounted. Here a message that does not
parse becomes an `Undecodable` naming the field, and the handler answers INVALID_ARGUMENT.

Finding the field walks the message in Python, on the event loop that carries every call, so the
walk is bounded: messages over EXPLAINED_BYTES, or with more than EXPLAINED_FIELDS fields before
the bad one, get INVALID_ARGUMENT without the field's name.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import descriptor
from google.protobuf.message import DecodeError

from recsys.v1 import recommender_pb2

SERVICE = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"]
EXPLAINED_BYTES = 64 * 1024
EXPLAINED_FIELDS = 2_000


class _TooLong(Exception):
    """The walk ran out of its field budget."""


@dataclass(frozen=True)
class Undecodable:
    """A request that did not parse; `reason` says where."""

    reason: str


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[offset]
        value |= (byte & 0x7F) << shift
        offset += 1
        if not byte & 0x80:
            return value, offset
        shift += 7


def _first_bad_field(message: descriptor.Descriptor, data: bytes, prefix: str = "",
                     budget: list[int] | None = None) -> str | None:
    """The path of the first string field that is not UTF-8 (e.g. "requests[2].user_id"), walking
    the wire format; "" where the bytes are malformed otherwise; None where nothing is wrong.
    Raises _TooLong after EXPLAINED_FIELDS fields (`budget` carries the count down the nesting)."""
    budget = budget if budget is not None else [EXPLAINED_FIELDS]
    counts: dict[str, int] = {}
    offset = 0
    try:
        while offset < len(data):
            budget[0] -= 1
            if budget[0] < 0:
                raise _TooLong
            key, offset = _varint(data, offset)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, offset = _varint(data, offset)
                continue
            if wire_type in (1, 5):
                offset += 8 if wire_type == 1 else 4
                continue
            if wire_type != 2:
                return ""
            length, offset = _varint(data, offset)
            payload, offset = data[offset:offset + length], offset + length
            if len(payload) != length:
                return ""
            field = message.fields_by_number.get(number)
            if field is None:
                continue
            path = prefix + field.name
            if field.is_repeated:
                path += f"[{counts.get(field.name, 0)}]"
                counts[field.name] = counts.get(field.name, 0) + 1
            if field.type == field.TYPE_STRING:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    return path
            elif field.type == field.TYPE_MESSAGE:
                found = _first_bad_field(field.message_type, payload, path + ".", budget)
                if found is not None:
                    return found
    except ValueError:
        return ""
    return None


def tolerant_decoder(message_class):
    def decode(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError:
            try:
                field = _first_bad_field(message_class.DESCRIPTOR, data) if len(data) <= EXPLAINED_BYTES else None
            except Exception:  # noqa: BLE001 - explaining must never fail the decoder (nor take long: _TooLong)
                field = None
            if field:
                return Undecodable(f"{field} is not valid UTF-8")
            return Undecodable(f"the request is not a valid {message_class.DESCRIPTOR.full_name}")
    return decode


def add_recommender_to_server(servicer, server: grpc.aio.Server) -> None:
    """Like the generated `add_RecommenderServicer_to_server`, with deserializers that never raise."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = getattr(recommender_pb2, method.input_type.name)
        response_class = getattr(recommender_pb2, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=tolerant_decoder(request_class),
                                     response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
