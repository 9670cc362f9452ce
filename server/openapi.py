"""An OpenAPI 3 document for the HTTP face, generated from recommender.proto: the messages' JSON
shapes from the descriptors (proto3's JSON mapping: lowerCamelCase names, 64-bit integers as
strings), the descriptions from the .proto's own comments."""
from __future__ import annotations

import re
from importlib import resources

from google.protobuf import descriptor

from recsys.v1 import recommender_pb2

_SCALARS = {
    descriptor.FieldDescriptor.TYPE_STRING: {"type": "string"},
    descriptor.FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    descriptor.FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    descriptor.FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    descriptor.FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    descriptor.FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    descriptor.FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    descriptor.FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
}
_DECLARATION = re.compile(r"^\s*(?:rpc\s+(\w+)|message\s+(\w+)|(?:repeated\s+)?[\w.]+\s+(\w+)\s*=\s*\d+)")


def proto_comments() -> dict[str, str]:
    """"Message", "Message.field" and "rpc Method" -> the `//` comment lines just above them."""
    text = resources.files("recsys.v1").joinpath("recommender.proto").read_text()
    comments: dict[str, str] = {}
    pending: list[str] = []
    message = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            pending.append(stripped[2:].strip())
            continue
        found = _DECLARATION.match(line)
        if found:
            rpc, new_message, field = found.groups()
            if new_message:
                message = new_message
            key = f"rpc {rpc}" if rpc else new_message or f"{message}.{field}"
            if pending:
                comments[key] = " ".join(pending)
        pending = []
    return comments


def _schema(message: descriptor.Descriptor, comments: dict[str, str]) -> dict:
    properties = {}
    for field in message.fields:
        if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            value = {"$ref": f"#/components/schemas/{field.message_type.name}"}
        else:
            value = dict(_SCALARS.get(field.type, {"type": "string"}))
        if field.is_repeated:
            value = {"type": "array", "items": value}
        if f"{message.name}.{field.name}" in comments:
            value["description"] = comments[f"{message.name}.{field.name}"]
        properties[field.json_name] = value
    schema = {"type": "object", "properties": properties}
    if message.name in comments:
        schema["description"] = comments[message.name]
    return schema


def _operation(method: descriptor.MethodDescriptor, comments: dict[str, str]) -> dict:
    response = {"$ref": f"#/components/schemas/{method.output_type.name}"}
    if method.server_streaming:
        content = {"application/x-ndjson": {"schema": response}}
        what = "One JSON object per line, best first."
    else:
        content = {"application/json": {"schema": response}}
        what = "One JSON object."
    return {
        "operationId": method.name,
        "summary": comments.get(f"rpc {method.name}", method.name),
        "requestBody": {"required": False, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{method.input_type.name}"}}}},
        "responses": {
            "200": {"description": what, "content": content},
            "default": {"description": "An error: the gRPC status code, its name and a message, with the HTTP "
                                       "status grpc-gateway gives that code.",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        },
    }


def openapi_document(routes: dict[str, str]) -> dict:
    """`routes`: method name -> path."""
    comments = proto_comments()
    service = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"]
    schemas = {name: _schema(message, comments) for name, message in recommender_pb2.DESCRIPTOR.message_types_by_name.items()}
    schemas["Error"] = {"type": "object", "properties": {
        "code": {"type": "integer"}, "status": {"type": "string"}, "message": {"type": "string"}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": service.full_name, "version": "v1",
                 "description": "The Recommender service of recommender.proto over HTTP and JSON (proto3's JSON "
                                "mapping). Credentials as over gRPC: 'Authorization: Bearer <token>'."},
        "paths": {routes[method.name]: {"post": _operation(method, comments)} for method in service.methods},
        "components": {"schemas": schemas},
    }
