//! The few places where the worker calls TensorFlow's C API below the `tensorflow` crate.
//!
//! Two reasons to go below it:
//!
//! - **Type codes.** `tensorflow-sys` 0.24 declares `TF_DataType` as a Rust enum with the
//!   values 1–23, and the C functions that answer a type (`TF_OperationOutputType`,
//!   `TF_TensorType`, `TF_OperationGetAttrType`) as returning it. TensorFlow also answers
//!   reference types (`DT_FLOAT_REF` = 101, the output of a `VariableV2` or an `Assign`) and
//!   newer types (float8, int4, ...), and an enum holding a value it does not list is
//!   undefined behaviour: debug builds happened to work, release builds crashed the worker
//!   with SIGSEGV on `sess.run(variable)`. So the functions here declare those C functions
//!   again, returning the `int` the C enum really is.
//! - **Calls the crate does not wrap** (partial runs), which need the raw `TF_Session*` and
//!   `TF_Operation*` the crate keeps in private fields. They are read out of the crate's
//!   structs, relying on their layout in exactly the version `Cargo.lock` pins (0.21.0),
//!   checked at compile time below and at run time in [`raw_operation`]. Upgrading the crate
//!   means re-checking both.
//!
//! A leaf: the tensors the worker owns and the steps run with them (`c_tensors.rs`) build on
//! this module, which knows nothing of them.

use std::ffi::{CStr, CString, c_char, c_int};
use std::mem::size_of;

use tensorflow::{Graph, Operation, Session};
use tensorflow_sys as tf;

use crate::failure::Failure;

// tensorflow 0.21: `Session { inner: *mut TF_Session }`, `Graph { gimpl: Arc<GraphImpl> }`,
// `Operation { inner: *mut TF_Operation, gimpl: Arc<GraphImpl> }`. A struct exactly as big as
// its one pointer field holds that field at offset 0; a struct of two pointer-sized fields
// has no padding, so both words are initialised.
const _: () = assert!(size_of::<Session>() == size_of::<*mut tf::TF_Session>());
const _: () = assert!(size_of::<Graph>() == size_of::<usize>());
const _: () = assert!(size_of::<Operation>() == 2 * size_of::<usize>());

// The same C functions as in tensorflow-sys, with `TF_DataType` as the `int` it is in C.
unsafe extern "C" {
    #[link_name = "TF_OperationOutputType"]
    fn operation_output_type(output: tf::TF_Output) -> c_int;
    #[link_name = "TF_TensorType"]
    fn tensor_type_code(tensor: *const tf::TF_Tensor) -> c_int;
    #[link_name = "TF_OperationGetAttrType"]
    fn operation_get_attr_type(
        operation: *mut tf::TF_Operation,
        attr_name: *const c_char,
        value: *mut c_int,
        status: *mut tf::TF_Status,
    );
}

/// TensorFlow's type code (`DataType` in types.proto; reference types are base + 100) of
/// output `index` of `operation`, which must have that many outputs.
pub fn output_type(graph: &Graph, operation: &Operation, index: i32) -> Result<i32, Failure> {
    let output = tf::TF_Output {
        oper: raw_operation(graph, operation)?,
        index,
    };
    // SAFETY: a live operation of the graph (the caller holds the graph), an index the
    // caller checked against its output count.
    Ok(unsafe { operation_output_type(output) })
}

/// TensorFlow's type code of a tensor it returned.
pub fn tensor_type(tensor: *const tf::TF_Tensor) -> i32 {
    // SAFETY: the caller passes a live tensor.
    unsafe { tensor_type_code(tensor) }
}

/// TensorFlow's type code held by a type attribute (`dtype` of a variable, ...).
pub fn attr_type(graph: &Graph, operation: &Operation, name: &str) -> Result<i32, Failure> {
    let oper = raw_operation(graph, operation)?;
    let name = CString::new(name)?;
    let status = RawStatus::new();
    let mut value: c_int = 0;
    // SAFETY: a live operation, a NUL-terminated name, a live status; TensorFlow writes one
    // int.
    unsafe { operation_get_attr_type(oper, name.as_ptr(), &mut value, status.0) };
    status.check()?;
    Ok(value)
}

pub fn raw_session(session: &Session) -> *mut tf::TF_Session {
    // SAFETY: see the layout assertions at the top: the struct is its one pointer field.
    unsafe { *(session as *const Session as *const *mut tf::TF_Session) }
}

/// The `TF_Operation*` of an operation of `graph`: of the operation's two words, the one
/// that is not the graph's shared pointer.
pub fn raw_operation(
    graph: &Graph,
    operation: &Operation,
) -> Result<*mut tf::TF_Operation, Failure> {
    // SAFETY: see the layout assertions at the top: plain reads of initialised words.
    let (graph_word, words) = unsafe {
        (
            *(graph as *const Graph as *const usize),
            *(operation as *const Operation as *const [usize; 2]),
        )
    };
    match words {
        [shared, inner] | [inner, shared] if shared == graph_word && inner != graph_word => {
            Ok(inner as *mut tf::TF_Operation)
        }
        _ => Err(Failure::internal(
            "the tensorflow crate's 0.21 struct layout changed; see worker/src/runtime/raw.rs",
        )),
    }
}

/// A `TF_Status`, deleted on drop.
pub struct RawStatus(pub *mut tf::TF_Status);

impl RawStatus {
    pub fn new() -> RawStatus {
        // SAFETY: TF_NewStatus has no preconditions.
        RawStatus(unsafe { tf::TF_NewStatus() })
    }

    pub fn check(&self) -> Result<(), Failure> {
        // SAFETY: a live status; TF_GetCode answers 0–16, all listed by `TF_Code`; TF_Message
        // returns a NUL-terminated string it owns.
        let (code, message) = unsafe {
            (
                tf::TF_GetCode(self.0) as i32,
                CStr::from_ptr(tf::TF_Message(self.0))
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        if code == 0 {
            Ok(())
        } else {
            Err(Failure::new(code, message))
        }
    }
}

impl Drop for RawStatus {
    fn drop(&mut self) {
        // SAFETY: created by TF_NewStatus, deleted once.
        unsafe { tf::TF_DeleteStatus(self.0) };
    }
}
