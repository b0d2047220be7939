"""Our proto/ against the ground truth: the descriptors the e2b wheel ships.

Every message, field (name, number, type, label, message/enum type, proto3
optional, oneof), enum value and RPC of E2B's `process` and `filesystem`
packages must exist in ours with the same shape; ours may add, never differ.
"""

import ast
import subprocess
from pathlib import Path

import e2b
import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[2]
WHEEL_FILES = {
    "process/process.proto": "envd/process/process_pb.py",
    "filesystem/filesystem.proto": "envd/filesystem/filesystem_pb.py",
}
OURS = {
    "process/process.proto": "envd/process.proto",
    "filesystem/filesystem.proto": "envd/filesystem.proto",
}


def wheel_descriptor(rel: str) -> descriptor_pb2.FileDescriptorProto:
    """The serialized FileDescriptorProto literal passed to `file_desc(...)`."""
    source = (Path(e2b.__file__).parent / rel).read_text()
    call = next(
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "file_desc"
    )
    raw = ast.literal_eval(call.args[0])
    return descriptor_pb2.FileDescriptorProto.FromString(raw)


@pytest.fixture(scope="module")
def ours() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    out = subprocess.run(
        ["cargo", "run", "-q", "-p", "wrenn-proto", "--example", "dump_descriptors"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    fds = descriptor_pb2.FileDescriptorSet.FromString(out)
    return {f.name: f for f in fds.file}


def field_shape(msg: descriptor_pb2.DescriptorProto, f):
    oneof = None
    if f.HasField("oneof_index") and not f.proto3_optional:
        oneof = msg.oneof_decl[f.oneof_index].name
    return (f.number, f.type, f.label, f.type_name, f.proto3_optional, oneof)


def messages(file: descriptor_pb2.FileDescriptorProto):
    def walk(prefix, msgs):
        for m in msgs:
            name = f"{prefix}{m.name}"
            yield name, m
            yield from walk(f"{name}.", m.nested_type)

    return dict(walk("", file.message_type))


@pytest.mark.parametrize("theirs_name", sorted(WHEEL_FILES))
def test_proto_matches_the_e2b_wheel(theirs_name, ours):
    theirs = wheel_descriptor(WHEEL_FILES[theirs_name])
    mine = ours[OURS[theirs_name]]
    assert mine.package == theirs.package

    their_msgs, my_msgs = messages(theirs), messages(mine)
    assert set(their_msgs) <= set(my_msgs), set(their_msgs) - set(my_msgs)
    for name, their_msg in their_msgs.items():
        my_msg = my_msgs[name]
        mine_by_name = {f.name: f for f in my_msg.field}
        for f in their_msg.field:
            assert f.name in mine_by_name, f"{name}.{f.name} missing"
            assert field_shape(my_msg, mine_by_name[f.name]) == field_shape(
                their_msg, f
            ), f"{name}.{f.name} differs"
            assert mine_by_name[f.name].json_name == f.json_name
        assert my_msg.options.map_entry == their_msg.options.map_entry

    my_enums = {e.name: e for e in mine.enum_type}
    for e in theirs.enum_type:
        assert {(v.name, v.number) for v in e.value} <= {
            (v.name, v.number) for v in my_enums[e.name].value
        }

    my_services = {s.name: s for s in mine.service}
    for s in theirs.service:
        my_methods = {
            m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in my_services[s.name].method
        }
        for m in s.method:
            assert my_methods[m.name] == (
                m.input_type,
                m.output_type,
                m.client_streaming,
                m.server_streaming,
            ), f"{s.name}.{m.name} differs"
