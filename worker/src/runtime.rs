//! The worker's one TensorFlow graph and session, and every operation on them.
//!
//! Runs share the state (`RwLock` read); load, extend, resets and variable transfer take it
//! exclusively. A worker hosts exactly one tfsd session, so "purge this session's variables"
//! is "open a new TensorFlow session on the same graph": a DirectSession owns its devices and
//! their resource managers, and nothing else in the process is touched. `TF_Reset` is never
//! used: besides resetting the containers, it closes every DirectSession in the process.

mod c_tensors;
mod partial_run;
mod raw;

use std::collections::HashSet;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use prost::Message;
use tensorflow::{
    Graph, ImportGraphDefOptions, Operation, Session, SessionOptions, SessionRunArgs,
};
use tfsd_protocol::tensor::{self, DType};
use tfsd_protocol::tensorflow::TensorProto;
use tfsd_protocol::tfsd::worker::v1 as wire;

use self::c_tensors::{OwnedTensors, data_type_of, new_tensor, session_run};
use crate::failure::Failure;

/// Prefix of the nodes the worker adds to read and assign variables during a recycle.
const INTERNAL_PREFIX: &str = "tfsd_internal";

struct Loaded {
    // Field order matters: the session must go before the graph it runs.
    session: Session,
    graph: Graph,
    config: Vec<u8>,
}

pub struct Runtime {
    state: RwLock<Loaded>,
}

/// `tensorflow.RunOptions`, only the field tfsd sets.
#[derive(Clone, PartialEq, prost::Message)]
struct RunOptions {
    #[prost(int64, tag = "2")]
    timeout_in_ms: i64,
}

/// The parts of `tensorflow.GraphDef` the worker reads to extend a live graph.
#[derive(Clone, PartialEq, prost::Message)]
struct GraphDefNodes {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeDefNames>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NodeDefNames {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, repeated, tag = "3")]
    input: Vec<String>,
}

fn new_session(graph: &Graph, config: &[u8]) -> Result<Session, Failure> {
    let mut options = SessionOptions::new();
    let config = session_config(config, thread_spinning());
    if !config.is_empty() {
        options.set_config(&config).map_err(|status| {
            Failure::invalid_argument(format!("config: {}", Failure::from(status).message))
        })?;
    }
    Ok(Session::new(&options, graph)?)
}

/// Whether TensorFlow's pool threads may spin while they wait for work (`TFSD_THREAD_SPINNING`
/// in the worker's environment, "0" in the daemon's defaults). Spinning buys a few µs of
/// wake-up per step with a core's worth of CPU that, on a daemon hosting many sessions,
/// belongs to the other sessions (and the supervisor): measured here, it was half the
/// worker's CPU per small step.
fn thread_spinning() -> bool {
    static SPINNING: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SPINNING.get_or_init(|| std::env::var("TFSD_THREAD_SPINNING").map_or(true, |v| v != "0"))
}

/// The client's serialized ConfigProto, with `experimental.disable_thread_spinning` set
/// unless spinning is allowed. Appending works because protobuf merges a repeated
/// occurrence of a message field into the first (and proto3 cannot say "false" explicitly,
/// so nothing the client set is overridden).
fn session_config(config: &[u8], spinning: bool) -> std::borrow::Cow<'_, [u8]> {
    /// ConfigProto.experimental (field 16, length-delimited) holding
    /// Experimental.disable_thread_spinning (field 9, varint) = true.
    const DISABLE_THREAD_SPINNING: [u8; 5] = [0x82, 0x01, 0x02, 0x48, 0x01];
    if spinning {
        return config.into();
    }
    let mut merged = config.to_vec();
    merged.extend_from_slice(&DISABLE_THREAD_SPINNING);
    merged.into()
}

/// ConfigProto.use_per_session_threads (field 9, varint) = true.
const PER_SESSION_THREADS: [u8; 2] = [0x48, 0x01];

/// One step of a typical small graph in a throwaway session (see `Runtime::new`): a fed
/// placeholder of known shape times a constant. Measured, the parts of TensorFlow's first-run
/// cost depend on what the first graph holds: a [1, 1] `x · x` step paid ~8 of ~30 ms, and a
/// client's first step with a constant operand still took ~25 ms; with this graph it takes
/// 2–4 ms.
fn warm_up() -> Result<(), Failure> {
    use tensorflow::{DataType, Output, Shape, Tensor};
    let mut graph = Graph::new();
    let mut x = graph.new_operation("Placeholder", "x")?;
    x.set_attr_type("dtype", DataType::Float)?;
    x.set_attr_shape("shape", &Shape::from(Some(vec![Some(2), Some(2)])))?;
    let x = x.finish()?;
    let mut identity = graph.new_operation("Const", "identity")?;
    identity.set_attr_type("dtype", DataType::Float)?;
    identity.set_attr_tensor(
        "value",
        Tensor::<f32>::new(&[2, 2]).with_values(&[1.0, 0.0, 0.0, 1.0])?,
    )?;
    let identity = identity.finish()?;
    let mut y = graph.new_operation("MatMul", "y")?;
    for operand in [&x, &identity] {
        y.add_input(Output {
            operation: operand.clone(),
            index: 0,
        });
    }
    let y = y.finish()?;
    let session = new_session(&graph, &PER_SESSION_THREADS)?;
    let values = [1.0, 2.0, 3.0, 4.0];
    let fed = Tensor::<f32>::new(&[2, 2]).with_values(&values)?;
    let mut args = SessionRunArgs::new();
    args.add_feed(&x, 0, &fed);
    let token = args.request_fetch(&y, 0);
    session.run(&mut args)?;
    let product: Tensor<f32> = args.fetch(token)?;
    close(session);
    if product[..] != values {
        return Err(Failure::internal(format!(
            "TensorFlow's warm-up step computed x · I = {:?} for x = {values:?}",
            &product[..]
        )));
    }
    Ok(())
}

fn import(
    graph: &mut Graph,
    graph_def: &[u8],
    options: &ImportGraphDefOptions,
) -> Result<(), Failure> {
    if graph_def.is_empty() {
        return Ok(());
    }
    graph
        .import_graph_def(graph_def, options)
        .map_err(|status| {
            let failure = Failure::from(status);
            Failure::new(
                failure.code,
                format!("GraphDef rejected by TensorFlow: {}", failure.message),
            )
        })
}

/// Splits "name:index" (index defaults to 0).
fn parse_endpoint(endpoint: &str) -> (&str, i32) {
    if let Some((name, index)) = endpoint.rsplit_once(':')
        && let Ok(index) = index.parse::<i32>()
    {
        return (name, index);
    }
    (endpoint, 0)
}

fn resolve_output(graph: &Graph, endpoint: &str, role: &str) -> Result<(Operation, i32), Failure> {
    let (name, index) = parse_endpoint(endpoint);
    let operation = graph
        .operation_by_name(name)
        .map_err(|_| {
            Failure::invalid_argument(format!("{role} {endpoint:?}: not a valid node name"))
        })?
        .ok_or_else(|| {
            Failure::invalid_argument(format!(
                "{role} {endpoint:?}: the session's graph has no node named {name:?}"
            ))
        })?;
    let outputs = operation.num_outputs();
    if index < 0 || index as usize >= outputs {
        return Err(Failure::invalid_argument(format!(
            "{role} {endpoint:?}: node {name:?} has {outputs} outputs"
        )));
    }
    Ok((operation, index))
}

fn close(mut session: Session) {
    // Closing can only fail for a session that is already closed.
    let _ = session.close();
}

/// Hands memory freed by a closed session back to the OS: heap pages glibc would otherwise
/// keep for later allocations (see `tune_allocator` in main.rs for the big ones).
fn release_free_memory() {
    // SAFETY: malloc_trim only returns free pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Runtime {
    /// A runtime with an empty graph, TensorFlow initialised by one throwaway step.
    ///
    /// A process's first `TF_SessionRun` costs ~30 ms of one-time initialisation (measured:
    /// 30 ms for a first session and step, 1.4 ms for a second); paid here, before the worker
    /// reports ready, it is paid while the worker waits in the warm pool instead of in the
    /// client's first step after a CreateSession or a recycle.
    ///
    /// Neither this step's session nor the placeholder session may create TensorFlow's
    /// process-wide inter-op pool: its size comes from the first session that does, which
    /// must be the client's, so both use per-session threads. (The CPU device's intra-op
    /// pool is process-wide too and made with the first session's devices, here the
    /// warm-up's: a client's `intra_op_parallelism_threads` has no effect in a worker, as it
    /// had none before the warm-up either, the placeholder session being first.)
    pub fn new() -> Result<Runtime, Failure> {
        warm_up()?;
        let graph = Graph::new();
        let session = new_session(&graph, &PER_SESSION_THREADS)?;
        Ok(Runtime {
            state: RwLock::new(Loaded {
                session,
                graph,
                config: Vec::new(),
            }),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Loaded> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Loaded> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces graph and session. Nothing changes if the graph or config is rejected.
    pub fn load(&self, graph_def: &[u8], config: &[u8]) -> Result<(), Failure> {
        let mut graph = Graph::new();
        import(&mut graph, graph_def, &ImportGraphDefOptions::new())?;
        let session = new_session(&graph, config)?;
        let mut state = self.write();
        let old = std::mem::replace(
            &mut *state,
            Loaded {
                session,
                graph,
                config: config.to_vec(),
            },
        );
        // The session goes before the graph it runs; then their memory goes back.
        close(old.session);
        drop(old.graph);
        release_free_memory();
        Ok(())
    }

    /// Imports more nodes into the live graph. Inputs naming nodes that already exist are
    /// mapped onto them, as TensorFlow's ExtendSession does; the session sees the new nodes
    /// at its next run.
    pub fn extend(&self, graph_def: &[u8]) -> Result<(), Failure> {
        let nodes = GraphDefNodes::decode(graph_def).map_err(|error| {
            Failure::invalid_argument(format!("graph_def is not a GraphDef: {error}"))
        })?;
        let mut state = self.write();
        let new_names: HashSet<&str> = nodes.node.iter().map(|n| n.name.as_str()).collect();
        let mut options = ImportGraphDefOptions::new();
        let mut mapped = HashSet::new();
        for input in nodes.node.iter().flat_map(|node| &node.input) {
            let (is_control, endpoint) = match input.strip_prefix('^') {
                Some(name) => (true, name),
                None => (false, input.as_str()),
            };
            let (name, index) = parse_endpoint(endpoint);
            if new_names.contains(name) || !mapped.insert(input.clone()) {
                continue;
            }
            let Ok(Some(existing)) = state.graph.operation_by_name(name) else {
                continue; // TensorFlow reports the missing input with its own message.
            };
            let result = if is_control {
                options.remap_control_dependency(name, &existing)
            } else {
                let output = tensorflow::Output {
                    operation: existing,
                    index,
                };
                options.add_input_mapping(name, index as usize, &output)
            };
            result.map_err(|_| {
                Failure::invalid_argument(format!("input {input:?} is not a valid name"))
            })?;
        }
        import(&mut state.graph, graph_def, &options)
    }

    /// One step, through the C API directly (see `c_tensors` for why).
    pub fn run(&self, run: wire::Run) -> Result<Vec<TensorProto>, Failure> {
        let state = self.read();
        let graph = &state.graph;
        let mut inputs = Vec::with_capacity(run.feeds.len());
        let mut values = OwnedTensors(Vec::with_capacity(run.feeds.len()));
        for (name, proto) in &run.feeds {
            let dense = tensor::decode(proto)
                .map_err(|error| Failure::invalid_argument(format!("feed {name:?}: {error}")))?;
            let (operation, index) = resolve_output(graph, name, "feed")?;
            inputs.push(tensorflow_sys::TF_Output {
                oper: raw::raw_operation(graph, &operation)?,
                index,
            });
            values.0.push(new_tensor(&dense)?);
        }
        let mut outputs = Vec::with_capacity(run.fetches.len());
        for name in &run.fetches {
            let (operation, index) = resolve_output(graph, name, "fetch")?;
            let code = raw::output_type(graph, &operation, index)?;
            DType::from_proto(code).map_err(|_| {
                Failure::invalid_argument(format!(
                    "fetch {name:?}: its type {} cannot be returned to a client",
                    type_name(code)
                ))
            })?;
            outputs.push(tensorflow_sys::TF_Output {
                oper: raw::raw_operation(graph, &operation)?,
                index,
            });
        }
        let mut targets = Vec::with_capacity(run.targets.len());
        for name in &run.targets {
            let name = name.strip_prefix('^').unwrap_or(name);
            let (operation, _) = resolve_target(graph, name)?;
            targets.push(raw::raw_operation(graph, &operation)? as *const _);
        }
        let options = (run.timeout_ms > 0).then(|| {
            RunOptions {
                timeout_in_ms: i64::try_from(run.timeout_ms).unwrap_or(i64::MAX),
            }
            .encode_to_vec()
        });
        session_run(
            &state.session,
            options.as_deref(),
            &inputs,
            &values,
            &outputs,
            &targets,
        )?
        .into_protos()
    }

    /// An empty graph and a new session with the same config.
    pub fn reset_graph(&self) -> Result<(), Failure> {
        let config = self.read().config.clone();
        self.load(&[], &config)
    }

    /// The same graph in a new session: every variable is uninitialised.
    pub fn purge_variables(&self) -> Result<(), Failure> {
        let mut state = self.write();
        let session = new_session(&state.graph, &state.config)?;
        let old = std::mem::replace(&mut state.session, session);
        close(old);
        release_free_memory();
        Ok(())
    }

    /// The value of every initialised variable (VariableV2 and resource variables).
    /// Uninitialised variables are skipped: they stay uninitialised after a recycle.
    pub fn export_variables(&self) -> Result<Vec<wire::NamedTensor>, Failure> {
        let mut state = self.write();
        let mut reads = Vec::new();
        let mut checks = Vec::new();
        for variable in variables(&state.graph) {
            checks.push(initialized_check(&mut state.graph, &variable)?);
            let output = match variable.kind {
                VariableKind::Reference => (variable.operation.clone(), 0),
                VariableKind::Resource => {
                    let name = format!("{INTERNAL_PREFIX}/export/{}", variable.name);
                    let read = match state.graph.operation_by_name(&name) {
                        Ok(Some(read)) => read,
                        _ => {
                            let mut op = state.graph.new_operation("ReadVariableOp", &name)?;
                            op.add_input(tensorflow::Output {
                                operation: variable.operation.clone(),
                                index: 0,
                            });
                            op.set_attr_type("dtype", data_type_of(variable.dtype()?))?;
                            op.finish()?
                        }
                    };
                    (read, 0)
                }
            };
            reads.push((variable, output));
        }
        let state = RwLockWriteGuard::downgrade(state);
        // Only initialised variables are read: reading an uninitialised one is an error that
        // TensorFlow also logs (twice per variable), noise for a normal recycle after a purge.
        if let Ok(initialized) = run_checks(&state, &checks) {
            let mut initialized = initialized.into_iter();
            reads.retain(|_| initialized.next().flatten().unwrap_or(true));
        }
        // One run for all; if some still fail, one run each to find the others.
        let read = |reads: &[&(Variable, (Operation, i32))]| -> Result<_, Failure> {
            let outputs = reads
                .iter()
                .map(|(_, (operation, index))| {
                    Ok(tensorflow_sys::TF_Output {
                        oper: raw::raw_operation(&state.graph, operation)?,
                        index: *index,
                    })
                })
                .collect::<Result<Vec<_>, Failure>>()?;
            let no_feeds = OwnedTensors(Vec::new());
            let values = session_run(&state.session, None, &[], &no_feeds, &outputs, &[])?;
            for (variable, _) in reads {
                variable.dtype()?;
            }
            let tensors = values.into_protos()?;
            Ok(reads
                .iter()
                .zip(tensors)
                .map(|((variable, _), tensor)| wire::NamedTensor {
                    name: variable.name.clone(),
                    tensor: Some(tensor),
                })
                .collect::<Vec<_>>())
        };
        let all: Vec<_> = reads.iter().collect();
        match read(&all) {
            Ok(values) => Ok(values),
            Err(_) => {
                let mut values = Vec::new();
                for one in &all {
                    match read(std::slice::from_ref(one)) {
                        Ok(value) => values.extend(value),
                        // A type tfsd cannot carry is an error; a variable TensorFlow
                        // cannot read (uninitialised) stays so after the recycle.
                        Err(failure) if failure.code == Failure::INTERNAL => return Err(failure),
                        Err(_) => {}
                    }
                }
                Ok(values)
            }
        }
    }

    /// Assigns each named variable its value (the output of `export_variables` elsewhere).
    pub fn import_variables(&self, values: Vec<wire::NamedTensor>) -> Result<(), Failure> {
        let mut state = self.write();
        // The values are TensorFlow tensors from the start, owned by `values` so that an
        // error on the way frees them.
        let mut placeholders = Vec::with_capacity(values.len());
        let mut tensors = OwnedTensors(Vec::with_capacity(values.len()));
        let mut targets = Vec::new();
        for value in &values {
            let variable = variables(&state.graph)
                .into_iter()
                .find(|v| v.name == value.name)
                .ok_or_else(|| {
                    Failure::new(
                        Failure::NOT_FOUND,
                        format!("no variable named {:?} in the graph", value.name),
                    )
                })?;
            let proto = value.tensor.clone().unwrap_or_default();
            let dense = tensor::decode(&proto).map_err(|error| {
                Failure::invalid_argument(format!("variable {:?}: {error}", value.name))
            })?;
            let prefix = format!("{INTERNAL_PREFIX}/import/{}", value.name);
            let placeholder = match state.graph.operation_by_name(&format!("{prefix}/value")) {
                Ok(Some(op)) => op,
                _ => {
                    let mut op = state
                        .graph
                        .new_operation("Placeholder", &format!("{prefix}/value"))?;
                    op.set_attr_type("dtype", data_type_of(dense.dtype))?;
                    op.finish()?
                }
            };
            let assign = match state.graph.operation_by_name(&format!("{prefix}/assign")) {
                Ok(Some(op)) => op,
                _ => {
                    let (op_type, type_attr) = match variable.kind {
                        VariableKind::Reference => ("Assign", "T"),
                        VariableKind::Resource => ("AssignVariableOp", "dtype"),
                    };
                    let mut op = state
                        .graph
                        .new_operation(op_type, &format!("{prefix}/assign"))?;
                    op.add_input(tensorflow::Output {
                        operation: variable.operation.clone(),
                        index: 0,
                    });
                    op.add_input(tensorflow::Output {
                        operation: placeholder.clone(),
                        index: 0,
                    });
                    op.set_attr_type(type_attr, data_type_of(variable.dtype()?))?;
                    op.finish()?
                }
            };
            tensors.0.push(new_tensor(&dense)?);
            placeholders.push(placeholder);
            targets.push(assign);
        }
        let state = RwLockWriteGuard::downgrade(state);
        let inputs = placeholders
            .iter()
            .map(|placeholder| {
                Ok(tensorflow_sys::TF_Output {
                    oper: raw::raw_operation(&state.graph, placeholder)?,
                    index: 0,
                })
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        let targets = targets
            .iter()
            .map(|target| raw::raw_operation(&state.graph, target).map(|op| op as *const _))
            .collect::<Result<Vec<_>, Failure>>()?;
        session_run(&state.session, None, &inputs, &tensors, &[], &targets)?;
        Ok(())
    }
}

fn resolve_target(graph: &Graph, name: &str) -> Result<(Operation, i32), Failure> {
    let operation = graph
        .operation_by_name(name)
        .map_err(|_| Failure::invalid_argument(format!("target {name:?}: not a valid node name")))?
        .ok_or_else(|| {
            Failure::invalid_argument(format!(
                "target {name:?}: the session's graph has no node named {name:?}"
            ))
        })?;
    Ok((operation, 0))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VariableKind {
    /// `VariableV2` (TF1 `tf.Variable` with `use_resource=False`): a reference output.
    Reference,
    /// `VarHandleOp` (resource variables, TF2's default): read with ReadVariableOp.
    Resource,
}

struct Variable {
    name: String,
    operation: Operation,
    kind: VariableKind,
    /// TensorFlow's code for its `dtype` attribute.
    type_code: i32,
}

impl Variable {
    fn dtype(&self) -> Result<DType, Failure> {
        DType::from_proto(self.type_code).map_err(|_| {
            Failure::internal(format!(
                "variable {:?} has type {}, which tfsd cannot carry over",
                self.name,
                type_name(self.type_code)
            ))
        })
    }
}

/// TensorFlow's name for a type code (`DT_COMPLEX64`, `DT_FLOAT_REF`), for messages.
fn type_name(code: i32) -> String {
    let (base, suffix) = if code > 100 {
        (code - 100, "_REF")
    } else {
        (code, "")
    };
    match tfsd_protocol::tensorflow::DataType::try_from(base) {
        Ok(data_type) => format!("{}{suffix}", data_type.as_str_name()),
        Err(_) => format!("with code {code}"),
    }
}

/// An op answering whether `variable` is initialised (built once, kept in the graph under
/// the internal prefix, like the export reads); `None` for a reference variable of a type
/// the tensorflow crate cannot name (float8, int4: its read reports that type by name).
fn initialized_check(graph: &mut Graph, variable: &Variable) -> Result<Option<Operation>, Failure> {
    let name = format!("{INTERNAL_PREFIX}/initialized/{}", variable.name);
    if let Ok(Some(check)) = graph.operation_by_name(&name) {
        return Ok(Some(check));
    }
    let input = tensorflow::Output {
        operation: variable.operation.clone(),
        index: 0,
    };
    let check = match variable.kind {
        VariableKind::Reference => {
            let Ok(dtype) = variable.dtype() else {
                return Ok(None);
            };
            let mut op = graph.new_operation("IsVariableInitialized", &name)?;
            op.add_input(input);
            op.set_attr_type("dtype", data_type_of(dtype))?;
            op.finish()?
        }
        VariableKind::Resource => {
            let mut op = graph.new_operation("VarIsInitializedOp", &name)?;
            op.add_input(input);
            op.finish()?
        }
    };
    Ok(Some(check))
}

/// Runs the `initialized_check`s in one step: per variable, whether it is initialised
/// (`None` where there is no check).
fn run_checks(state: &Loaded, checks: &[Option<Operation>]) -> Result<Vec<Option<bool>>, Failure> {
    let present: Vec<&Operation> = checks.iter().flatten().collect();
    if present.is_empty() {
        return Ok(vec![None; checks.len()]);
    }
    let outputs = present
        .iter()
        .map(|operation| {
            Ok(tensorflow_sys::TF_Output {
                oper: raw::raw_operation(&state.graph, operation)?,
                index: 0,
            })
        })
        .collect::<Result<Vec<_>, Failure>>()?;
    let values = session_run(
        &state.session,
        None,
        &[],
        &OwnedTensors(Vec::new()),
        &outputs,
        &[],
    )?;
    let mut answers = values
        .into_protos()?
        .iter()
        .map(|proto| match tensor::decode(proto) {
            Ok(tensor::DenseTensor {
                data: tensor::DenseData::Bytes(bytes),
                ..
            }) => Ok(bytes.first().is_some_and(|byte| *byte != 0)),
            _ => Err(Failure::new(
                Failure::INTERNAL,
                "an initialisation check answered no bool".to_string(),
            )),
        })
        .collect::<Result<Vec<bool>, Failure>>()?
        .into_iter();
    Ok(checks
        .iter()
        .map(|check| check.as_ref().and_then(|_| answers.next()))
        .collect())
}

/// Every variable in the graph, skipping the nodes tfsd added itself.
fn variables(graph: &Graph) -> Vec<Variable> {
    graph
        .operation_iter()
        .filter_map(|operation| {
            let kind = match operation.op_type().ok()?.as_str() {
                "VariableV2" | "Variable" => VariableKind::Reference,
                "VarHandleOp" => VariableKind::Resource,
                _ => return None,
            };
            let name = operation.name().ok()?;
            if name.starts_with(INTERNAL_PREFIX) {
                return None;
            }
            let type_code = raw::attr_type(graph, &operation, "dtype").ok()?;
            Some(Variable {
                name,
                operation,
                kind,
                type_code,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{parse_endpoint, session_config};
    use prost::Message;

    #[test]
    fn disabling_thread_spinning_keeps_the_clients_config() {
        #[derive(Clone, PartialEq, prost::Message)]
        struct Experimental {
            #[prost(string, tag = "1")]
            collective_group_leader: String,
            #[prost(bool, tag = "9")]
            disable_thread_spinning: bool,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct ConfigProto {
            #[prost(int32, tag = "5")]
            inter_op_parallelism_threads: i32,
            #[prost(message, optional, tag = "16")]
            experimental: Option<Experimental>,
        }
        let client = ConfigProto {
            inter_op_parallelism_threads: -1,
            experimental: Some(Experimental {
                collective_group_leader: "/job:x".into(),
                disable_thread_spinning: false,
            }),
        }
        .encode_to_vec();
        let merged = ConfigProto::decode(&*session_config(&client, false)).expect("decode");
        assert_eq!(merged.inter_op_parallelism_threads, -1);
        let experimental = merged.experimental.expect("experimental");
        assert_eq!(experimental.collective_group_leader, "/job:x");
        assert!(experimental.disable_thread_spinning);

        let empty = ConfigProto::decode(&*session_config(&[], false)).expect("decode");
        assert!(empty.experimental.expect("set").disable_thread_spinning);
        assert_eq!(&*session_config(&client, true), &client[..]);
    }

    #[test]
    fn endpoints_default_to_output_zero() {
        assert_eq!(parse_endpoint("x"), ("x", 0));
        assert_eq!(parse_endpoint("scope/y:2"), ("scope/y", 2));
        assert_eq!(parse_endpoint("odd:name"), ("odd:name", 0));
    }
}

#[cfg(test)]
mod variable_tests {
    use super::*;
    use tensorflow::{DataType, Shape, Tensor};

    fn graph_with_variables() -> Vec<u8> {
        let mut graph = Graph::new();
        let mut w = graph.new_operation("VariableV2", "w").expect("op");
        w.set_attr_type("dtype", DataType::Float).expect("dtype");
        w.set_attr_shape("shape", &Shape::from(Some(Vec::new())))
            .expect("shape");
        let w = w.finish().expect("w");
        let mut three = graph.new_operation("Const", "three").expect("op");
        three
            .set_attr_type("dtype", DataType::Float)
            .expect("dtype");
        three
            .set_attr_tensor(
                "value",
                Tensor::<f32>::new(&[]).with_values(&[3.0]).expect("value"),
            )
            .expect("value");
        let three = three.finish().expect("three");
        let mut init = graph.new_operation("Assign", "w_init").expect("op");
        init.add_input(w.clone());
        init.add_input(three.clone());
        init.finish().expect("init");
        let mut v = graph.new_operation("VarHandleOp", "v").expect("op");
        v.set_attr_type("dtype", DataType::Float).expect("dtype");
        v.set_attr_shape("shape", &Shape::from(Some(Vec::new())))
            .expect("shape");
        let v = v.finish().expect("v");
        let mut init = graph
            .new_operation("AssignVariableOp", "v_init")
            .expect("op");
        init.add_input(v);
        init.add_input(three);
        init.set_attr_type("dtype", DataType::Float).expect("dtype");
        init.finish().expect("init");
        graph.graph_def().expect("graph_def")
    }

    fn run_targets(runtime: &Runtime, targets: &[&str]) {
        runtime
            .run(wire::Run {
                targets: targets.iter().map(|t| t.to_string()).collect(),
                ..wire::Run::default()
            })
            .expect("run");
    }

    #[test]
    fn variables_move_between_runtimes() {
        let source = Runtime::new().expect("runtime");
        source.load(&graph_with_variables(), &[]).expect("load");
        assert!(
            source.export_variables().expect("export").is_empty(),
            "nothing initialised yet"
        );
        run_targets(&source, &["w_init", "v_init"]);
        let exported = source.export_variables().expect("export");
        let names: Vec<_> = exported.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");

        let target = Runtime::new().expect("runtime");
        target.load(&graph_with_variables(), &[]).expect("load");
        target.import_variables(exported).expect("import");
        let outputs = target
            .run(wire::Run {
                fetches: vec!["w".into()],
                ..wire::Run::default()
            })
            .expect("read w");
        assert_eq!(outputs[0].tensor_content.as_ref(), 3.0f32.to_le_bytes());
    }
}
