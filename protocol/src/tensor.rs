//! TensorFlow's `TensorProto` as tfsd reads and writes it: validation and decoding into one
//! dense little-endian buffer (or a list of byte strings), and encoding back.
//!
//! Pure code shared by the supervisor (which validates every feed before it reaches a worker,
//! so a malformed tensor is an INVALID_ARGUMENT naming the feed) and the worker (which turns
//! the dense form into a TensorFlow tensor). It knows nothing of TensorFlow's library.

use bytes::Bytes;

use crate::tensorflow::{TensorProto, TensorShapeProto, tensor_shape_proto::Dim};

/// The element types tfsd carries. Numbers are TensorFlow's `DataType` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    Float,
    Double,
    Int32,
    UInt8,
    Int16,
    Int8,
    String,
    Int64,
    Bool,
    BFloat16,
    UInt16,
    Half,
    UInt32,
    UInt64,
}

impl DType {
    /// All supported types, for exhaustive tests and error messages.
    pub const ALL: [DType; 14] = [
        DType::Float,
        DType::Double,
        DType::Int32,
        DType::UInt8,
        DType::Int16,
        DType::Int8,
        DType::String,
        DType::Int64,
        DType::Bool,
        DType::BFloat16,
        DType::UInt16,
        DType::Half,
        DType::UInt32,
        DType::UInt64,
    ];

    /// TensorFlow's `DataType` number.
    pub fn to_proto(self) -> i32 {
        match self {
            DType::Float => 1,
            DType::Double => 2,
            DType::Int32 => 3,
            DType::UInt8 => 4,
            DType::Int16 => 5,
            DType::Int8 => 6,
            DType::String => 7,
            DType::Int64 => 9,
            DType::Bool => 10,
            DType::BFloat16 => 14,
            DType::UInt16 => 17,
            DType::Half => 19,
            DType::UInt32 => 22,
            DType::UInt64 => 23,
        }
    }

    /// Maps TensorFlow's `DataType` number; reference types (`DT_FLOAT_REF` = 101, ...) map
    /// to their base type, as TensorFlow does when it hands out a value.
    pub fn from_proto(value: i32) -> Result<DType, TensorError> {
        let base = if value > 100 { value - 100 } else { value };
        DType::ALL
            .into_iter()
            .find(|dtype| dtype.to_proto() == base)
            .ok_or(TensorError::UnsupportedDtype(value))
    }

    /// Bytes per element in `tensor_content`; `None` for strings, which use `string_val`.
    pub fn element_size(self) -> Option<usize> {
        match self {
            DType::String => None,
            DType::UInt8 | DType::Int8 | DType::Bool => Some(1),
            DType::Int16 | DType::UInt16 | DType::Half | DType::BFloat16 => Some(2),
            DType::Float | DType::Int32 | DType::UInt32 => Some(4),
            DType::Double | DType::Int64 | DType::UInt64 => Some(8),
        }
    }

    /// TensorFlow's name for the type, as users see it in Python (`float32`, `string`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::Float => "float32",
            DType::Double => "float64",
            DType::Int32 => "int32",
            DType::UInt8 => "uint8",
            DType::Int16 => "int16",
            DType::Int8 => "int8",
            DType::String => "string",
            DType::Int64 => "int64",
            DType::Bool => "bool",
            DType::BFloat16 => "bfloat16",
            DType::UInt16 => "uint16",
            DType::Half => "float16",
            DType::UInt32 => "uint32",
            DType::UInt64 => "uint64",
        }
    }
}

/// Why a `TensorProto` cannot be used. Messages are meant for the client who sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error(
        "dtype {0} is not supported (supported: float16, bfloat16, float32, float64, int8, \
         int16, int32, int64, uint8, uint16, uint32, uint64, bool, string)"
    )]
    UnsupportedDtype(i32),
    #[error("the tensor has no shape of known rank (tensor_shape.unknown_rank is set)")]
    UnknownRank,
    #[error("the shape has {rank} dimensions; TensorFlow allows at most {MAX_RANK}")]
    TooManyDimensions { rank: usize },
    #[error("dimension {index} has size {size}; sizes must be 0 or more")]
    NegativeDimension { index: usize, size: i64 },
    #[error("the shape {shape:?} has more elements than fit in memory")]
    TooManyElements { shape: Vec<i64> },
    #[error(
        "tensor_content has {actual} bytes, but shape {shape:?} of {dtype} needs {expected} \
         ({elements} elements × {element_size} bytes)"
    )]
    ContentLength {
        dtype: &'static str,
        shape: Vec<i64>,
        elements: u64,
        element_size: usize,
        expected: u64,
        actual: usize,
    },
    #[error("{field} holds {count} values, but shape {shape:?} has only {elements} elements")]
    TooManyValues {
        field: &'static str,
        count: usize,
        shape: Vec<i64>,
        elements: u64,
    },
    #[error(
        "tensor_content of a string tensor of shape {shape:?} must hold {elements} varint \
         lengths and then the strings' bytes, as TensorFlow encodes it"
    )]
    StringContent { shape: Vec<i64>, elements: u64 },
    #[error("a {dtype} tensor must use {expected}, but {found} is set")]
    WrongValueField {
        dtype: &'static str,
        expected: &'static str,
        found: &'static str,
    },
}

/// A tensor's elements in one place.
#[derive(Debug, Clone, PartialEq)]
pub enum DenseData {
    /// Little-endian element bytes, `elements × element_size` long. Bools are 0 or 1.
    Bytes(Bytes),
    /// One byte string per element.
    Strings(Vec<Vec<u8>>),
}

/// A decoded tensor: type, shape and every element.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseTensor {
    pub dtype: DType,
    pub dims: Vec<u64>,
    pub data: DenseData,
}

impl DenseTensor {
    pub fn element_count(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The most dimensions a shape may have: TensorFlow's own bound (`TensorShape::MaxDimensions`).
/// It also bounds the shapes that error messages quote.
pub const MAX_RANK: usize = 254;

/// What a string element costs besides its own bytes: TensorFlow's `tstring` header is 24
/// bytes, and so is the decoded form's `Vec` header. A shape of 2^28 empty strings is 6 GiB
/// of headers, whatever the proto weighs.
pub const STRING_ELEMENT_OVERHEAD: u64 = 24;

fn shape_of(proto: &TensorProto) -> Result<(Vec<u64>, u64), TensorError> {
    let Some(shape) = &proto.tensor_shape else {
        return Ok((Vec::new(), 1));
    };
    if shape.unknown_rank {
        return Err(TensorError::UnknownRank);
    }
    if shape.dim.len() > MAX_RANK {
        return Err(TensorError::TooManyDimensions {
            rank: shape.dim.len(),
        });
    }
    let mut dims = Vec::with_capacity(shape.dim.len());
    let mut elements: u64 = 1;
    for (index, dim) in shape.dim.iter().enumerate() {
        let size = u64::try_from(dim.size).map_err(|_| TensorError::NegativeDimension {
            index,
            size: dim.size,
        })?;
        elements = elements
            .checked_mul(size)
            .ok_or_else(|| TensorError::TooManyElements {
                shape: raw_shape(proto),
            })?;
        dims.push(size);
    }
    Ok((dims, elements))
}

fn raw_shape(proto: &TensorProto) -> Vec<i64> {
    proto
        .tensor_shape
        .as_ref()
        .map(|shape| shape.dim.iter().map(|dim| dim.size).collect())
        .unwrap_or_default()
}

/// The typed value fields that are set, by name, for error messages.
fn set_value_fields(proto: &TensorProto) -> Vec<&'static str> {
    let fields: [(&'static str, bool); 11] = [
        ("half_val", !proto.half_val.is_empty()),
        ("float_val", !proto.float_val.is_empty()),
        ("double_val", !proto.double_val.is_empty()),
        ("int_val", !proto.int_val.is_empty()),
        ("string_val", !proto.string_val.is_empty()),
        ("scomplex_val", !proto.scomplex_val.is_empty()),
        ("int64_val", !proto.int64_val.is_empty()),
        ("bool_val", !proto.bool_val.is_empty()),
        ("dcomplex_val", !proto.dcomplex_val.is_empty()),
        ("uint32_val", !proto.uint32_val.is_empty()),
        ("uint64_val", !proto.uint64_val.is_empty()),
    ];
    fields
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
}

/// The `*_val` field a dtype's values live in when `tensor_content` is empty.
fn value_field(dtype: DType) -> &'static str {
    match dtype {
        DType::Float => "float_val",
        DType::Double => "double_val",
        DType::Int32 | DType::UInt8 | DType::Int16 | DType::Int8 | DType::UInt16 => "int_val",
        DType::String => "string_val",
        DType::Int64 => "int64_val",
        DType::Bool => "bool_val",
        DType::BFloat16 | DType::Half => "half_val",
        DType::UInt32 => "uint32_val",
        DType::UInt64 => "uint64_val",
    }
}

/// Expands `values` to `elements` items the way TensorFlow does: no values means all zeros,
/// fewer values than elements repeats the last one (how `make_tensor_proto` writes a
/// broadcast scalar), more values than elements is an error.
fn expand<T: Clone + Default>(
    values: &[T],
    elements: u64,
    field: &'static str,
    proto: &TensorProto,
) -> Result<Vec<T>, TensorError> {
    let too_many = || TensorError::TooManyValues {
        field,
        count: values.len(),
        shape: raw_shape(proto),
        elements,
    };
    if values.len() as u64 > elements {
        return Err(too_many());
    }
    let elements = usize::try_from(elements).map_err(|_| TensorError::TooManyElements {
        shape: raw_shape(proto),
    })?;
    let mut out = Vec::new();
    out.try_reserve_exact(elements)
        .map_err(|_| TensorError::TooManyElements {
            shape: raw_shape(proto),
        })?;
    out.extend_from_slice(values);
    let fill = values.last().cloned().unwrap_or_default();
    out.resize(elements, fill);
    Ok(out)
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], to_le: impl Fn(T) -> [u8; N]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * N);
    for value in values {
        out.extend_from_slice(&to_le(*value));
    }
    Bytes::from(out)
}

/// Checks a tensor without copying its elements: the dtype is supported, the shape is valid,
/// and the values match the shape. Cheap enough to run on every feed in the supervisor.
pub fn validate(proto: &TensorProto) -> Result<(), TensorError> {
    let dtype = DType::from_proto(proto.dtype)?;
    let (_, elements) = shape_of(proto)?;
    check_values(proto, dtype, elements)
}

/// How many bytes the tensor takes once decoded (`decode`), after validating it as `validate`
/// does: for numbers, elements × element size, however few values the proto carries
/// (TensorFlow repeats the last value to fill the shape, so 66 bytes can declare a gigabyte);
/// for strings, every element's bytes (repeated ones included) plus
/// `STRING_ELEMENT_OVERHEAD` each. Saturates at `u64::MAX`. What a worker allocates for a
/// feed is about twice this: the decoded buffer and TensorFlow's own tensor.
pub fn decoded_size(proto: &TensorProto) -> Result<u64, TensorError> {
    let dtype = DType::from_proto(proto.dtype)?;
    let (_, elements) = shape_of(proto)?;
    check_values(proto, dtype, elements)?;
    Ok(match dtype.element_size() {
        Some(element_size) => elements.saturating_mul(element_size as u64),
        None => {
            let bytes = if proto.tensor_content.is_empty() {
                // `check_values` saw no more values than elements.
                let given: u64 = proto.string_val.iter().map(|s| s.len() as u64).sum();
                let repeated = elements.saturating_sub(proto.string_val.len() as u64);
                let last = proto.string_val.last().map_or(0, |s| s.len() as u64);
                given.saturating_add(repeated.saturating_mul(last))
            } else {
                // The lengths and then the strings: the strings are fewer bytes than this.
                proto.tensor_content.len() as u64
            };
            bytes.saturating_add(elements.saturating_mul(STRING_ELEMENT_OVERHEAD))
        }
    })
}

fn check_values(proto: &TensorProto, dtype: DType, elements: u64) -> Result<(), TensorError> {
    let expected_field = value_field(dtype);
    let wrong_field = set_value_fields(proto)
        .into_iter()
        .find(|field| *field != expected_field);
    if let Some(found) = wrong_field {
        return Err(TensorError::WrongValueField {
            dtype: dtype.name(),
            expected: expected_field,
            found,
        });
    }
    match dtype.element_size() {
        None if !proto.tensor_content.is_empty() => {
            decode_string_list(&proto.tensor_content, elements)
                .map(drop)
                .ok_or_else(|| TensorError::StringContent {
                    shape: raw_shape(proto),
                    elements,
                })
        }
        Some(element_size) if !proto.tensor_content.is_empty() => {
            let expected = elements.checked_mul(element_size as u64).ok_or_else(|| {
                TensorError::TooManyElements {
                    shape: raw_shape(proto),
                }
            })?;
            if expected != proto.tensor_content.len() as u64 {
                return Err(TensorError::ContentLength {
                    dtype: dtype.name(),
                    shape: raw_shape(proto),
                    elements,
                    element_size,
                    expected,
                    actual: proto.tensor_content.len(),
                });
            }
            Ok(())
        }
        _ => {
            let count = value_count(proto, dtype);
            if count as u64 > elements {
                return Err(TensorError::TooManyValues {
                    field: expected_field,
                    count,
                    shape: raw_shape(proto),
                    elements,
                });
            }
            Ok(())
        }
    }
}

fn value_count(proto: &TensorProto, dtype: DType) -> usize {
    match dtype {
        DType::Float => proto.float_val.len(),
        DType::Double => proto.double_val.len(),
        DType::Int32 | DType::UInt8 | DType::Int16 | DType::Int8 | DType::UInt16 => {
            proto.int_val.len()
        }
        DType::String => proto.string_val.len(),
        DType::Int64 => proto.int64_val.len(),
        DType::Bool => proto.bool_val.len(),
        DType::BFloat16 | DType::Half => proto.half_val.len(),
        DType::UInt32 => proto.uint32_val.len(),
        DType::UInt64 => proto.uint64_val.len(),
    }
}

/// A string tensor's `tensor_content` as TensorFlow's C++ runtime writes it (its own remote
/// clients send strings this way, e.g. the MasterService client): `elements` lengths as
/// varint32s, then the strings' bytes back to back. `None` unless it holds exactly that.
fn decode_string_list(content: &[u8], elements: u64) -> Option<Vec<Vec<u8>>> {
    let mut at = 0usize;
    let mut lengths = Vec::new();
    for _ in 0..elements {
        let mut length = 0u64;
        let mut shift = 0;
        loop {
            let byte = *content.get(at)?;
            at += 1;
            length |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 28 {
                return None;
            }
        }
        lengths.push(usize::try_from(length).ok()?);
    }
    let mut strings = Vec::with_capacity(lengths.len());
    for length in lengths {
        let end = at.checked_add(length)?;
        strings.push(content.get(at..end)?.to_vec());
        at = end;
    }
    (at == content.len()).then_some(strings)
}

/// Decodes a tensor into its dense form, accepting `tensor_content` and the typed `*_val`
/// fields (with TensorFlow's broadcast of the last value).
pub fn decode(proto: &TensorProto) -> Result<DenseTensor, TensorError> {
    let dtype = DType::from_proto(proto.dtype)?;
    let (dims, elements) = shape_of(proto)?;
    check_values(proto, dtype, elements)?;
    let field = value_field(dtype);
    let data = if dtype == DType::String && !proto.tensor_content.is_empty() {
        DenseData::Strings(
            decode_string_list(&proto.tensor_content, elements).ok_or_else(|| {
                TensorError::StringContent {
                    shape: raw_shape(proto),
                    elements,
                }
            })?,
        )
    } else if dtype == DType::String {
        let strings = expand(&proto.string_val, elements, field, proto)?;
        DenseData::Strings(strings)
    } else if !proto.tensor_content.is_empty() || elements == 0 {
        let mut content = proto.tensor_content.clone();
        if dtype == DType::Bool && content.iter().any(|byte| *byte > 1) {
            content = content.iter().map(|byte| u8::from(*byte != 0)).collect();
        }
        DenseData::Bytes(content)
    } else {
        DenseData::Bytes(match dtype {
            DType::Float => le_bytes(
                &expand(&proto.float_val, elements, field, proto)?,
                f32::to_le_bytes,
            ),
            DType::Double => le_bytes(
                &expand(&proto.double_val, elements, field, proto)?,
                f64::to_le_bytes,
            ),
            DType::Int32 => le_bytes(
                &expand(&proto.int_val, elements, field, proto)?,
                i32::to_le_bytes,
            ),
            // TensorFlow stores the narrow integer types in int32 values and truncates.
            DType::Int16 => le_bytes(&expand(&proto.int_val, elements, field, proto)?, |v| {
                (v as i16).to_le_bytes()
            }),
            DType::UInt16 => le_bytes(&expand(&proto.int_val, elements, field, proto)?, |v| {
                (v as u16).to_le_bytes()
            }),
            DType::Int8 => le_bytes(&expand(&proto.int_val, elements, field, proto)?, |v| {
                (v as i8).to_le_bytes()
            }),
            DType::UInt8 => le_bytes(&expand(&proto.int_val, elements, field, proto)?, |v| {
                (v as u8).to_le_bytes()
            }),
            DType::Half | DType::BFloat16 => {
                le_bytes(&expand(&proto.half_val, elements, field, proto)?, |v| {
                    (v as u16).to_le_bytes()
                })
            }
            DType::Int64 => le_bytes(
                &expand(&proto.int64_val, elements, field, proto)?,
                i64::to_le_bytes,
            ),
            DType::Bool => le_bytes(&expand(&proto.bool_val, elements, field, proto)?, |v| {
                [u8::from(v)]
            }),
            DType::UInt32 => le_bytes(
                &expand(&proto.uint32_val, elements, field, proto)?,
                u32::to_le_bytes,
            ),
            DType::UInt64 => le_bytes(
                &expand(&proto.uint64_val, elements, field, proto)?,
                u64::to_le_bytes,
            ),
            DType::String => unreachable!("strings are handled above"),
        })
    };
    Ok(DenseTensor { dtype, dims, data })
}

/// Encodes a dense tensor as TensorFlow does for results: `tensor_content` for numbers,
/// `string_val` for strings.
pub fn encode(tensor: DenseTensor) -> TensorProto {
    let tensor_shape = Some(TensorShapeProto {
        dim: tensor
            .dims
            .iter()
            .map(|size| Dim {
                size: *size as i64,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    });
    let mut proto = TensorProto {
        dtype: tensor.dtype.to_proto(),
        tensor_shape,
        ..TensorProto::default()
    };
    match tensor.data {
        DenseData::Bytes(bytes) => proto.tensor_content = bytes,
        DenseData::Strings(strings) => {
            proto.string_val = strings;
        }
    }
    proto
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz;
