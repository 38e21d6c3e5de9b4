"""Samples, their codecs (Arrow for the log, tf.train.Example and TFRecord for stacks built
around TensorFlow, JSON for debugging) and their tensor form."""

from minutely.data.arrow import (
    arrow_schema,
    decode_batch,
    encode_batch,
    record_batch_to_samples,
    samples_to_record_batch,
)
from minutely.data.example import (
    DecodedExamples,
    ExampleSpec,
    encode_tfrecords,
    examples_to_record_batch,
    record_batch_to_examples,
    split_tfrecords,
)
from minutely.data.hashing import feature_salt, hash_ids
from minutely.data.json_codec import samples_from_json, samples_to_json
from minutely.data.samples import Sample
from minutely.data.tensors import (
    Jagged,
    TensorBatch,
    concat_tensor_batches,
    instances_to_tensors,
    record_batch_to_tensors,
)

__all__ = [
    "DecodedExamples",
    "ExampleSpec",
    "Jagged",
    "Sample",
    "TensorBatch",
    "arrow_schema",
    "concat_tensor_batches",
    "decode_batch",
    "encode_batch",
    "encode_tfrecords",
    "examples_to_record_batch",
    "feature_salt",
    "hash_ids",
    "instances_to_tensors",
    "record_batch_to_examples",
    "record_batch_to_samples",
    "record_batch_to_tensors",
    "samples_from_json",
    "samples_to_json",
    "samples_to_record_batch",
    "split_tfrecords",
]
