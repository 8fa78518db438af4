//! TensorFlow tensors made and read through the C API, for the steps the worker runs with
//! `TF_SessionRun` / `TF_SessionPRun` directly. Compared with the crate's `Tensor<T>`, a feed
//! is one copy into memory TensorFlow allocated (the crate zero-fills it first: a third of the
//! worker's CPU for a 64 MiB feed), and a fetch whose buffer the step produced for it alone is
//! not copied at all: its bytes stay in TensorFlow's buffer until the response has been
//! written. A fetch that shares its buffer (a `VariableV2`'s value, or an `Identity` of it,
//! which a concurrent step may assign in place) is copied at once.
//!
//! `session_run` is the `TF_SessionRun` step over these tensors. This module builds on
//! `raw.rs` (type codes, the raw session, statuses), never the other way round.

use std::ffi::c_int;

use bytes::Bytes;
use tensorflow::{DataType, Session, TensorType}; // TensorType: ByteString::pack and unpack
use tensorflow_sys as tf;
use tfsd_protocol::tensor::{self, DType, DenseData, DenseTensor};
use tfsd_protocol::tensorflow::TensorProto;

use super::raw::{self, RawStatus, raw_session};
use crate::byte_string::ByteString;
use crate::failure::Failure;

/// Tensors we own, deleted on drop (null entries are skipped).
pub struct OwnedTensors(pub Vec<*mut tf::TF_Tensor>);

impl OwnedTensors {
    /// `count` empty slots, for TensorFlow to fill with a step's outputs.
    pub fn slots(count: usize) -> OwnedTensors {
        OwnedTensors(vec![std::ptr::null_mut(); count])
    }

    /// Each tensor as a TensorProto; numeric payloads are handed over without a copy.
    pub fn into_protos(mut self) -> Result<Vec<TensorProto>, Failure> {
        self.0
            .iter_mut()
            .map(|slot| take(std::mem::replace(slot, std::ptr::null_mut())).map(tensor::encode))
            .collect()
    }
}

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

/// The crate's `DataType` for a tfsd type.
pub fn data_type_of(dtype: DType) -> DataType {
    match dtype {
        DType::Float => DataType::Float,
        DType::Double => DataType::Double,
        DType::Int32 => DataType::Int32,
        DType::UInt8 => DataType::UInt8,
        DType::Int16 => DataType::Int16,
        DType::Int8 => DataType::Int8,
        DType::String => DataType::String,
        DType::Int64 => DataType::Int64,
        DType::Bool => DataType::Bool,
        DType::BFloat16 => DataType::BFloat16,
        DType::UInt16 => DataType::UInt16,
        DType::Half => DataType::Half,
        DType::UInt32 => DataType::UInt32,
        DType::UInt64 => DataType::UInt64,
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
pub fn new_tensor(dense: &DenseTensor) -> Result<*mut tf::TF_Tensor, Failure> {
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

/// One step through `TF_SessionRun`: `inputs[i]` is fed `values[i]` (which stay ours),
/// `outputs` are fetched into tensors handed to the caller, `targets` run.
/// `run_options` is a serialized RunOptions.
pub fn session_run(
    session: &Session,
    run_options: Option<&[u8]>,
    inputs: &[tf::TF_Output],
    values: &OwnedTensors,
    outputs: &[tf::TF_Output],
    targets: &[*const tf::TF_Operation],
) -> Result<OwnedTensors, Failure> {
    assert_eq!(inputs.len(), values.0.len(), "one value per input");
    let options = run_options.map(|bytes| tf::TF_Buffer {
        data: bytes.as_ptr() as *const std::ffi::c_void,
        length: bytes.len(),
        data_deallocator: None,
    });
    let options_ptr = options
        .as_ref()
        .map_or(std::ptr::null(), |buffer| buffer as *const tf::TF_Buffer);
    let mut results = OwnedTensors::slots(outputs.len());
    let status = RawStatus::new();
    // SAFETY: the session and the operations are alive (the caller holds the runtime's
    // lock); every array outlives the call and has the length passed; TensorFlow reads the
    // inputs (they stay ours) and stores one new tensor per output in `results`, which we
    // then own; the options buffer is only read.
    unsafe {
        tf::TF_SessionRun(
            raw_session(session),
            options_ptr,
            inputs.as_ptr(),
            values.0.as_ptr(),
            inputs.len() as c_int,
            outputs.as_ptr(),
            results.0.as_mut_ptr(),
            outputs.len() as c_int,
            targets.as_ptr(),
            targets.len() as c_int,
            std::ptr::null_mut(),
            status.0,
        );
    }
    status.check()?;
    Ok(results)
}

/// A tensor TensorFlow returned, owned: its bytes, readable from any thread, deleted with it.
/// Only made for tensors whose buffer nothing else references (`TF_TensorMaybeMove`).
struct Owned(*mut tf::TF_Tensor);

// SAFETY: the buffer is referenced by this tensor alone (checked with TF_TensorMaybeMove
// before an `Owned` is handed out), so nothing writes it any more; reading and deleting it
// need no particular thread.
unsafe impl Send for Owned {}

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: a live tensor; its data is TF_TensorByteSize bytes long.
        unsafe {
            let size = tf::TF_TensorByteSize(self.0);
            let data = tf::TF_TensorData(self.0) as *const u8;
            if size == 0 || data.is_null() {
                &[]
            } else {
                std::slice::from_raw_parts(data, size)
            }
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: owned, deleted once.
        unsafe { tf::TF_DeleteTensor(self.0) };
    }
}

/// The dense form of a tensor TensorFlow returned, taking ownership of it.
fn take(tensor: *mut tf::TF_Tensor) -> Result<DenseTensor, Failure> {
    if tensor.is_null() {
        return Err(Failure::internal(
            "TensorFlow returned no tensor for a fetch",
        ));
    }
    let tensor = Owned(tensor);
    let code = raw::tensor_type(tensor.0);
    // SAFETY: a live tensor.
    let dims: Vec<u64> = unsafe {
        (0..tf::TF_NumDims(tensor.0))
            .map(|index| tf::TF_Dim(tensor.0, index) as u64)
            .collect()
    };
    let dtype = DType::from_proto(code).map_err(|_| {
        Failure::invalid_argument(format!(
            "a fetch has TensorFlow type {code}, which cannot be returned to a client"
        ))
    })?;
    let data = match dtype {
        DType::String => {
            let count = dims.iter().product::<u64>() as usize;
            let strings = ByteString::unpack(tensor.as_ref(), count)?;
            DenseData::Strings(strings.into_iter().map(|s| s.0).collect())
        }
        // TensorFlow keeps every other supported type as its little-endian elements (bool as
        // 0 or 1, bfloat16 and half as their 16 bits): TensorProto's tensor_content layout.
        // SAFETY: a live tensor; TF_TensorMaybeMove only reads its buffer's reference counts
        // and answers the same tensor when nothing else references the buffer, or null.
        _ if !unsafe { tf::TF_TensorMaybeMove(tensor.0) }.is_null() => {
            DenseData::Bytes(Bytes::from_owner(tensor))
        }
        _ => DenseData::Bytes(Bytes::copy_from_slice(tensor.as_ref())),
    };
    Ok(DenseTensor { dtype, dims, data })
}

#[cfg(not(target_endian = "little"))]
compile_error!("tfsd-worker hands TensorFlow's tensor bytes over as little-endian");
