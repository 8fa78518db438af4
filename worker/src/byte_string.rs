//! `ByteString`: a TensorFlow string element as the bytes it is.
//!
//! TensorFlow strings are byte strings (serialized protos, images, `tf.io.serialize_tensor`
//! output), but the `tensorflow` crate's `Tensor<String>` insists on UTF-8 and panics on
//! anything else. `ByteString` implements the crate's `TensorType` for `DT_STRING` with the
//! same `TF_TString` calls the crate uses for `String`, minus the UTF-8 check.

use std::alloc::{Layout, alloc, dealloc};
use std::ffi::c_void;
use std::fmt;

use tensorflow::{Code, DataType, Status, TensorDataNoCRepr, TensorType};
use tensorflow_sys as tf;

/// One element of a string tensor.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct ByteString(pub Vec<u8>);

impl fmt::Display for ByteString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(&self.0))
    }
}

fn tstring_layout(count: usize) -> Option<Layout> {
    Layout::array::<tf::TF_TString>(count.max(1)).ok()
}

/// Frees what `pack` allocated: each TF_TString, then the array.
unsafe extern "C" fn deallocate(data: *mut c_void, length: usize, _arg: *mut c_void) {
    let count = length / std::mem::size_of::<tf::TF_TString>();
    let strings = data as *mut tf::TF_TString;
    for index in 0..count {
        // SAFETY: `pack` initialised `count` TF_TStrings at `data`.
        unsafe { tf::TF_StringDealloc(strings.add(index)) };
    }
    if let Some(layout) = tstring_layout(count) {
        // SAFETY: allocated in `pack` with this layout.
        unsafe { dealloc(data as *mut u8, layout) };
    }
}

impl TensorType for ByteString {
    type InnerType = TensorDataNoCRepr<ByteString>;

    fn data_type() -> DataType {
        DataType::String
    }

    fn zero() -> Self {
        ByteString::default()
    }

    fn one() -> Self {
        ByteString(vec![1])
    }

    fn is_repr_c() -> bool {
        false
    }

    fn unpack(data: &[u8], count: usize) -> tensorflow::Result<Vec<Self>> {
        let strings = data.as_ptr() as *const tf::TF_TString;
        let mut out = Vec::with_capacity(count);
        for index in 0..count {
            // SAFETY: TensorFlow hands over `count` initialised TF_TStrings in `data`.
            let bytes = unsafe {
                let string = strings.add(index);
                let pointer = tf::TF_StringGetDataPointer(string) as *const u8;
                let size = tf::TF_StringGetSize(string);
                if size == 0 {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(pointer, size)
                }
            };
            out.push(ByteString(bytes.to_vec()));
        }
        Ok(out)
    }

    fn pack(data: &[Self], dims: &[u64]) -> tensorflow::Result<*mut tf::TF_Tensor> {
        let bytes = data.len() * std::mem::size_of::<tf::TF_TString>();
        let layout = tstring_layout(data.len()).ok_or_else(|| {
            Status::new_set_lossy(Code::ResourceExhausted, "string tensor too large")
        })?;
        // SAFETY: the layout is non-zero-sized; each TF_TString is initialised before
        // TensorFlow sees it, and `deallocate` frees exactly this allocation.
        unsafe {
            let strings = alloc(layout) as *mut tf::TF_TString;
            if strings.is_null() {
                return Err(Status::new_set_lossy(
                    Code::ResourceExhausted,
                    "could not allocate a string tensor",
                ));
            }
            for (index, value) in data.iter().enumerate() {
                let string = strings.add(index);
                tf::TF_StringInit(string);
                tf::TF_StringCopy(string, value.0.as_ptr() as *const _, value.0.len());
            }
            let tensor = tf::TF_NewTensor(
                tf::TF_DataType::TF_STRING,
                dims.as_ptr() as *const i64,
                dims.len() as i32,
                strings as *mut c_void,
                bytes,
                Some(deallocate),
                std::ptr::null_mut(),
            );
            if tensor.is_null() {
                deallocate(strings as *mut c_void, bytes, std::ptr::null_mut());
                return Err(Status::new_set_lossy(
                    Code::Internal,
                    "TF_NewTensor returned null for a string tensor",
                ));
            }
            Ok(tensor)
        }
    }
}
