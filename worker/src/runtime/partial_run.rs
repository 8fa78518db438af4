//! Partial runs: one step whose feeds arrive and whose fetches leave over several calls
//! (`tf.compat.v1.Session.partial_run`), through TensorFlow's `TF_SessionPRunSetup` and
//! `TF_SessionPRun`.
//!
//! The `tensorflow` crate 0.21 wraps neither. A second, raw TensorFlow session would not do:
//! a DirectSession owns its devices, so it would not see the session's variables. So this
//! module calls `tensorflow-sys` with the raw session and operation pointers that
//! [`super::raw`] reads out of the crate's structs.

use std::ffi::{CStr, CString, c_int};

use tensorflow::Graph;
use tensorflow_sys as tf;
use tfsd_protocol::tensor;
use tfsd_protocol::tensorflow::TensorProto;
use tfsd_protocol::tfsd::worker::v1 as wire;

use super::c_tensors::{OwnedTensors, new_tensor};
use super::raw::{RawStatus, raw_operation, raw_session};
use super::{Runtime, resolve_output, resolve_target};
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
        let mut results = OwnedTensors::slots(fetches.len());
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
        results.into_protos()
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
