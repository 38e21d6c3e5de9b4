"""tf.train.Example messages (``example_pb2``), wire-compatible with TensorFlow's example.proto.

The codec (:mod:`minutely.data.example`) reads and writes the wire format itself; these generated
messages are the protobuf view of the same bytes, for tools and tests.
"""
