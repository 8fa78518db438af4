//! TensorFlow's `TensorProto`, validated and decoded: the codec lives in the `tfsd-protocol`
//! crate, shared with the worker, and is re-exported here so the daemon reads it as its own.

pub use tfsd_protocol::tensor::*;
