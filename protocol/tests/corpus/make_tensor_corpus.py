"""Regenerates protocol/tests/corpus/tensor/: TensorProtos as TensorFlow 2.21 writes them
(valid-*), malformed ones (invalid-*), and bytes that are not a TensorProto (garbage-*).
Run with the project venv: .venv/bin/python protocol/tests/corpus/make_tensor_corpus.py"""

import pathlib

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2

OUT = pathlib.Path(__file__).resolve().parent / "tensor"
OUT.mkdir(exist_ok=True)

valid = {
    "float-matrix": tf.make_tensor_proto(np.arange(6, dtype=np.float32).reshape(2, 3)),
    "float-broadcast": tf.make_tensor_proto(1.5, shape=[4]),
    "double-scalar": tf.make_tensor_proto(np.float64(2.25)),
    "int8": tf.make_tensor_proto(np.array([-128, 0, 127], dtype=np.int8)),
    "uint16": tf.make_tensor_proto(np.array([0, 65535], dtype=np.uint16)),
    "int64-extremes": tf.make_tensor_proto(np.array([-(2**63), 2**63 - 1], dtype=np.int64)),
    "half": tf.make_tensor_proto(np.array([1.0, -0.0, np.inf], dtype=np.float16)),
    "bfloat16": tf.make_tensor_proto(tf.constant([1.0, 2.5], dtype=tf.bfloat16)),
    "bool": tf.make_tensor_proto(np.array([True, False, True])),
    "strings": tf.make_tensor_proto(np.array([b"a", b"\xff\x00", "wörld".encode()], dtype=object)),
    "uint64": tf.make_tensor_proto(np.array([2**64 - 1], dtype=np.uint64)),
    "empty": tf.make_tensor_proto(np.zeros([0, 3], dtype=np.float32)),
}
for name, proto in valid.items():
    (OUT / f"valid-{name}.bin").write_bytes(proto.SerializeToString())

short = tensor_pb2.TensorProto()
short.CopyFrom(valid["float-matrix"])
short.tensor_content = short.tensor_content[:-4]
negative = tensor_pb2.TensorProto(dtype=1)
negative.tensor_shape.dim.add(size=-3)
unknown_dtype = tensor_pb2.TensorProto(dtype=99)
too_many = tf.make_tensor_proto(np.array([1, 2, 3], dtype=np.int32))
too_many.tensor_shape.dim[0].size = 2
too_many.tensor_content = b""
too_many.int_val.extend([1, 2, 3])
invalid = {
    "short-content": short,
    "negative-dim": negative,
    "unknown-dtype": unknown_dtype,
    "too-many-values": too_many,
}
for name, proto in invalid.items():
    (OUT / f"invalid-{name}.bin").write_bytes(proto.SerializeToString())

# A truncated varint and a field with an impossible length.
(OUT / "garbage-truncated.bin").write_bytes(b"\x08\xff\xff\xff")
(OUT / "garbage-length.bin").write_bytes(b"\x22\xff\xff\xff\xff\x0f\x00")
print(f"wrote {len(list(OUT.iterdir()))} seeds to {OUT}")
