//! Partial runs: one step whose feeds arrive and whose fetches leave over several calls
//! (`tf.compat.v1.Session.partial_run`), through TensorFlow's `TF_SessionPRunSetup` and
//! `TF_SessionPRun`.
//!
//! The `tensorflow` crate 0.21 wraps neither. A second, raw TensorFlow session would not do:
//! a DirectSession owns its devices, so it would not see the session's variables. So this
//! module calls `tensorflow-sys` with the raw session and operation pointers that
//! [`super::raw`] reads out of the crate's structs.

use std::ffi::{CStr, CString, c_int};

use tensorflow::{Graph, TensorType};
use tensorflow_sys as tf;
use tfsd::proto::tensorflow::TensorProto;
use tfsd::proto::tfsd::worker::v1 as wire;
use tfsd::tensor::{self, DType, DenseData, DenseTensor};

use super::raw::{self, RawStatus, raw_operation, raw_session};
use super::{Runtime, resolve_output, resolve_target};
use crate::byte_string::ByteString;
use crate::failure::Failure;

impl Runtime {
    /// Starts a partial run; answers TensorFlow's handle for it.
    pub fn partial_run_setup(&self, setup: wire::PartialRunSetup) -> Result<String, Failure> {
        let state = self.read();
        let graph = &state.graph;
        let feeds = outputs(graph, &setup.feeds, "feed")?;
        let fetches = outputs(graph, &setup.fetches, "fetch")?;
        let mut targets = Vec::with_capacity(setup.targets.len());
        for name in &setup.targets {
            let name = name.strip_prefix('^').unwrap_or(name);
            let (operation, _) = resolve_target(graph, name)?;
            targets.push(raw_operation(graph, &operation)? as *const tf::TF_Operation);
        }
        let status = RawStatus::new();
        let mut handle: *const std::ffi::c_char = std::ptr::null();
        // SAFETY: every pointer comes from the live session and graph, which the read lock
        // keeps alive; the arrays outlive the call; TensorFlow writes a new handle string.
        unsafe {
            tf::TF_SessionPRunSetup(
                raw_session(&state.session),
                feeds.as_ptr(),
                feeds.len() as c_int,
                fetches.as_ptr(),
                fetches.len() as c_int,
                targets.as_ptr(),
                targets.len() as c_int,
                &mut handle,
                status.0,
            );
        }
        status.check()?;
        if handle.is_null() {
            return Err(Failure::internal("TF_SessionPRunSetup returned no handle"));
        }
        // SAFETY: TensorFlow returned a NUL-terminated string that we now own.
        let text = unsafe { CStr::from_ptr(handle) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: the handle came from TF_SessionPRunSetup and is freed exactly once.
        unsafe { tf::TF_DeletePRunHandle(handle) };
        Ok(text)
    }

    /// Feeds some of a partial run's inputs and fetches some of its outputs.
    pub fn partial_run(&self, run: wire::PartialRun) -> Result<Vec<TensorProto>, Failure> {
        let state = self.read();
        let graph = &state.graph;
        let mut inputs = Vec::with_capacity(run.feeds.len());
        let mut values = OwnedTensors(Vec::with_capacity(run.feeds.len()));
        for (name, proto) in &run.feeds {
            let dense = tensor::decode(proto)
                .map_err(|error| Failure::invalid_argument(format!("feed {name:?}: {error}")))?;
            let (operation, index) = resolve_output(graph, name, "feed")?;
            inputs.push(tf::TF_Output {
                oper: raw_operation(graph, &operation)?,
                index,
            });
            values.0.push(new_tensor(&dense)?);
        }
        let fetches = outputs(graph, &run.fetches, "fetch")?;
        let mut results = OwnedTensors(vec![std::ptr::null_mut(); fetches.len()]);
        let handle = CString::new(run.handle)?;
        let status = RawStatus::new();
        // SAFETY: as in `partial_run_setup`; TensorFlow copies the inputs (we keep and free
        // them) and stores one new tensor per fetch in `results`, which we then own.
        unsafe {
            tf::TF_SessionPRun(
                raw_session(&state.session),
                handle.as_ptr(),
                inputs.as_ptr(),
                values.0.as_ptr(),
                inputs.len() as c_int,
                fetches.as_ptr(),
                results.0.as_mut_ptr(),
                fetches.len() as c_int,
                std::ptr::null(),
                0,
                status.0,
            );
        }
        status.check()?;
        results
            .0
            .iter()
            .map(|&result| read_tensor(result).map(tensor::encode))
            .collect()
    }
}

fn outputs(graph: &Graph, names: &[String], role: &str) -> Result<Vec<tf::TF_Output>, Failure> {
    names
        .iter()
        .map(|name| {
            let (operation, index) = resolve_output(graph, name, role)?;
            Ok(tf::TF_Output {
                oper: raw_operation(graph, &operation)?,
                index,
            })
        })
        .collect()
}

/// Tensors we own, deleted on drop (null entries are skipped).
struct OwnedTensors(Vec<*mut tf::TF_Tensor>);

impl Drop for OwnedTensors {
    fn drop(&mut self) {
        for &tensor in &self.0 {
            if !tensor.is_null() {
                // SAFETY: each non-null entry is a tensor we own, deleted once.
                unsafe { tf::TF_DeleteTensor(tensor) };
            }
        }
    }
}

fn c_data_type(dtype: DType) -> tf::TF_DataType {
    use tf::TF_DataType as C;
    match dtype {
        DType::Float => C::TF_FLOAT,
        DType::Double => C::TF_DOUBLE,
        DType::Int32 => C::TF_INT32,
        DType::UInt8 => C::TF_UINT8,
        DType::Int16 => C::TF_INT16,
        DType::Int8 => C::TF_INT8,
        DType::String => C::TF_STRING,
        DType::Int64 => C::TF_INT64,
        DType::Bool => C::TF_BOOL,
        DType::BFloat16 => C::TF_BFLOAT16,
        DType::UInt16 => C::TF_UINT16,
        DType::Half => C::TF_HALF,
        DType::UInt32 => C::TF_UINT32,
        DType::UInt64 => C::TF_UINT64,
    }
}

/// A new TensorFlow tensor holding a decoded feed.
fn new_tensor(dense: &DenseTensor) -> Result<*mut tf::TF_Tensor, Failure> {
    let dims: Vec<i64> = dense.dims.iter().map(|&d| d as i64).collect();
    match &dense.data {
        DenseData::Strings(strings) => {
            let strings: Vec<ByteString> = strings.iter().cloned().map(ByteString).collect();
            Ok(ByteString::pack(&strings, &dense.dims)?)
        }
        DenseData::Bytes(bytes) => {
            // SAFETY: TensorFlow allocates `bytes.len()` bytes (the dense size for these
            // dims, checked by tensor::decode), which are filled before anyone reads them.
            unsafe {
                let tensor = tf::TF_AllocateTensor(
                    c_data_type(dense.dtype),
                    dims.as_ptr(),
                    dims.len() as c_int,
                    bytes.len(),
                );
                if tensor.is_null() {
                    return Err(Failure::internal("TF_AllocateTensor failed"));
                }
                if !bytes.is_empty() {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        tf::TF_TensorData(tensor) as *mut u8,
                        bytes.len(),
                    );
                }
                Ok(tensor)
            }
        }
    }
}

/// The dense form of a tensor TensorFlow returned.
fn read_tensor(tensor: *mut tf::TF_Tensor) -> Result<DenseTensor, Failure> {
    if tensor.is_null() {
        return Err(Failure::internal("TF_SessionPRun returned no tensor"));
    }
    // SAFETY: a live tensor; its data is TF_TensorByteSize bytes long.
    let (code, dims, data) = unsafe {
        let dims: Vec<u64> = (0..tf::TF_NumDims(tensor))
            .map(|index| tf::TF_Dim(tensor, index) as u64)
            .collect();
        let size = tf::TF_TensorByteSize(tensor);
        let data = tf::TF_TensorData(tensor) as *const u8;
        let bytes = if size == 0 || data.is_null() {
            &[][..]
        } else {
            std::slice::from_raw_parts(data, size)
        };
        (raw::tensor_type(tensor), dims, bytes)
    };
    let dtype = DType::from_proto(code).map_err(|_| {
        Failure::invalid_argument(format!(
            "a fetch has TensorFlow type {code}, which cannot be returned to a client"
        ))
    })?;
    let count = dims.iter().product::<u64>() as usize;
    let data = match dtype {
        DType::String => DenseData::Strings(
            ByteString::unpack(data, count)?
                .into_iter()
                .map(|s| s.0)
                .collect(),
        ),
        _ => DenseData::Bytes(bytes::Bytes::copy_from_slice(data)),
    };
    Ok(DenseTensor { dtype, dims, data })
}
