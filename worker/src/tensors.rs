//! Between tfsd's dense tensors (decoded from TensorProto by `tfsd::tensor`) and the
//! `tensorflow` crate's typed `Tensor<T>`: one enum arm per supported element type.

use half::f16;
use tensorflow::{BFloat16, DataType, FetchToken, Operation, SessionRunArgs, Tensor, TensorType};
use tfsd::tensor::{DType, DenseData, DenseTensor};

use crate::byte_string::ByteString;
use crate::failure::Failure;

/// A TensorFlow tensor of any supported element type.
#[derive(Debug)]
pub enum AnyTensor {
    Float(Tensor<f32>),
    Double(Tensor<f64>),
    Int32(Tensor<i32>),
    UInt8(Tensor<u8>),
    Int16(Tensor<i16>),
    Int8(Tensor<i8>),
    String(Tensor<ByteString>),
    Int64(Tensor<i64>),
    Bool(Tensor<bool>),
    BFloat16(Tensor<BFloat16>),
    UInt16(Tensor<u16>),
    Half(Tensor<f16>),
    UInt32(Tensor<u32>),
    UInt64(Tensor<u64>),
}

/// Applies `$body` to the typed tensor inside an `AnyTensor`, whatever its type.
macro_rules! with_tensor {
    ($any:expr, $tensor:ident => $body:expr) => {
        match $any {
            AnyTensor::Float($tensor) => $body,
            AnyTensor::Double($tensor) => $body,
            AnyTensor::Int32($tensor) => $body,
            AnyTensor::UInt8($tensor) => $body,
            AnyTensor::Int16($tensor) => $body,
            AnyTensor::Int8($tensor) => $body,
            AnyTensor::String($tensor) => $body,
            AnyTensor::Int64($tensor) => $body,
            AnyTensor::Bool($tensor) => $body,
            AnyTensor::BFloat16($tensor) => $body,
            AnyTensor::UInt16($tensor) => $body,
            AnyTensor::Half($tensor) => $body,
            AnyTensor::UInt32($tensor) => $body,
            AnyTensor::UInt64($tensor) => $body,
        }
    };
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

/// Element types whose in-memory form is exactly their little-endian bytes, valid for every
/// bit pattern tfsd hands them (bools arrive as 0 or 1: `tfsd::tensor::decode` normalises
/// them). Their tensors are filled and read with one memcpy instead of an element loop:
/// the difference between ~150 MB/s and memory speed for big tensors.
///
/// # Safety
/// Implement only for types with no padding, no invalid bit patterns among the values
/// written, and the layout of their little-endian bytes.
unsafe trait PlainBytes: TensorType + Copy {}

#[cfg(not(target_endian = "little"))]
compile_error!("tfsd-worker copies tensor bytes as little-endian, TensorFlow's wire order");

// SAFETY: primitive numbers; f16 is repr(transparent) over u16; bools are 0 or 1 here.
unsafe impl PlainBytes for f32 {}
unsafe impl PlainBytes for f64 {}
unsafe impl PlainBytes for i8 {}
unsafe impl PlainBytes for i16 {}
unsafe impl PlainBytes for i32 {}
unsafe impl PlainBytes for i64 {}
unsafe impl PlainBytes for u8 {}
unsafe impl PlainBytes for u16 {}
unsafe impl PlainBytes for u32 {}
unsafe impl PlainBytes for u64 {}
unsafe impl PlainBytes for f16 {}
unsafe impl PlainBytes for bool {}

/// A tensor of `dims` whose elements are `bytes` (already checked to be the right length).
fn plain<T: PlainBytes>(dims: &[u64], bytes: &[u8]) -> Tensor<T> {
    let mut tensor = Tensor::<T>::new(dims);
    let size = std::mem::size_of_val::<[T]>(&tensor);
    // SAFETY: the tensor's elements are `size` initialised bytes, and PlainBytes types
    // accept every bit pattern written here.
    let target = unsafe { std::slice::from_raw_parts_mut(tensor.as_mut_ptr() as *mut u8, size) };
    target.copy_from_slice(&bytes[..size]);
    tensor
}

/// The elements' bytes, in one copy.
fn plain_bytes<T: PlainBytes>(tensor: &Tensor<T>) -> DenseData {
    let size = std::mem::size_of_val::<[T]>(tensor);
    // SAFETY: reading `size` initialised bytes of plain data.
    let source = unsafe { std::slice::from_raw_parts(tensor.as_ptr() as *const u8, size) };
    DenseData::Bytes(bytes::Bytes::copy_from_slice(source))
}

fn numeric<T: TensorType, const N: usize>(
    dims: &[u64],
    bytes: &[u8],
    from_le: impl Fn([u8; N]) -> T,
) -> Tensor<T> {
    let mut tensor = Tensor::<T>::new(dims);
    for (slot, chunk) in tensor.iter_mut().zip(bytes.chunks_exact(N)) {
        let mut raw = [0u8; N];
        raw.copy_from_slice(chunk);
        *slot = from_le(raw);
    }
    tensor
}

impl AnyTensor {
    /// Builds a TensorFlow tensor from a validated dense tensor.
    pub fn from_dense(dense: &DenseTensor) -> AnyTensor {
        let dims = &dense.dims;
        let bytes = match &dense.data {
            DenseData::Bytes(bytes) => bytes.as_ref(),
            DenseData::Strings(strings) => {
                let mut tensor = Tensor::<ByteString>::new(dims);
                for (slot, value) in tensor.iter_mut().zip(strings) {
                    *slot = ByteString(value.clone());
                }
                return AnyTensor::String(tensor);
            }
        };
        match dense.dtype {
            DType::Float => AnyTensor::Float(plain(dims, bytes)),
            DType::Double => AnyTensor::Double(plain(dims, bytes)),
            DType::Int32 => AnyTensor::Int32(plain(dims, bytes)),
            DType::UInt8 => AnyTensor::UInt8(plain(dims, bytes)),
            DType::Int16 => AnyTensor::Int16(plain(dims, bytes)),
            DType::Int8 => AnyTensor::Int8(plain(dims, bytes)),
            DType::Int64 => AnyTensor::Int64(plain(dims, bytes)),
            DType::Bool => AnyTensor::Bool(plain(dims, bytes)),
            DType::BFloat16 => AnyTensor::BFloat16(numeric(dims, bytes, |raw: [u8; 2]| {
                BFloat16::from(f32::from_bits(u32::from(u16::from_le_bytes(raw)) << 16))
            })),
            DType::UInt16 => AnyTensor::UInt16(plain(dims, bytes)),
            DType::Half => AnyTensor::Half(plain(dims, bytes)),
            DType::UInt32 => AnyTensor::UInt32(plain(dims, bytes)),
            DType::UInt64 => AnyTensor::UInt64(plain(dims, bytes)),
            DType::String => unreachable!("string tensors carry DenseData::Strings"),
        }
    }

    /// Adds this tensor as a feed of `operation:index`.
    pub fn feed<'a>(&'a self, args: &mut SessionRunArgs<'a>, operation: &Operation, index: i32) {
        with_tensor!(self, tensor => args.add_feed(operation, index, tensor))
    }

    /// Takes a fetched output of type `dtype` out of a finished run.
    pub fn take(
        args: &mut SessionRunArgs<'_>,
        token: FetchToken,
        dtype: DType,
    ) -> Result<AnyTensor, Failure> {
        Ok(match dtype {
            DType::Float => AnyTensor::Float(args.fetch(token)?),
            DType::Double => AnyTensor::Double(args.fetch(token)?),
            DType::Int32 => AnyTensor::Int32(args.fetch(token)?),
            DType::UInt8 => AnyTensor::UInt8(args.fetch(token)?),
            DType::Int16 => AnyTensor::Int16(args.fetch(token)?),
            DType::Int8 => AnyTensor::Int8(args.fetch(token)?),
            DType::String => AnyTensor::String(args.fetch(token)?),
            DType::Int64 => AnyTensor::Int64(args.fetch(token)?),
            DType::Bool => AnyTensor::Bool(args.fetch(token)?),
            DType::BFloat16 => AnyTensor::BFloat16(args.fetch(token)?),
            DType::UInt16 => AnyTensor::UInt16(args.fetch(token)?),
            DType::Half => AnyTensor::Half(args.fetch(token)?),
            DType::UInt32 => AnyTensor::UInt32(args.fetch(token)?),
            DType::UInt64 => AnyTensor::UInt64(args.fetch(token)?),
        })
    }

    /// The dense form, for encoding into a TensorProto.
    pub fn into_dense(self) -> DenseTensor {
        fn le<T: TensorType + Copy, const N: usize>(
            tensor: &Tensor<T>,
            to_le: impl Fn(T) -> [u8; N],
        ) -> DenseData {
            let mut out = Vec::with_capacity(tensor.len() * N);
            for value in tensor.iter() {
                out.extend_from_slice(&to_le(*value));
            }
            DenseData::Bytes(out.into())
        }
        let dims = with_tensor!(&self, tensor => tensor.dims().to_vec());
        let (dtype, data) = match &self {
            AnyTensor::Float(t) => (DType::Float, plain_bytes(t)),
            AnyTensor::Double(t) => (DType::Double, plain_bytes(t)),
            AnyTensor::Int32(t) => (DType::Int32, plain_bytes(t)),
            AnyTensor::UInt8(t) => (DType::UInt8, plain_bytes(t)),
            AnyTensor::Int16(t) => (DType::Int16, plain_bytes(t)),
            AnyTensor::Int8(t) => (DType::Int8, plain_bytes(t)),
            AnyTensor::Int64(t) => (DType::Int64, plain_bytes(t)),
            AnyTensor::Bool(t) => (DType::Bool, plain_bytes(t)),
            // BFloat16 is not repr(transparent) in the crate: element by element.
            AnyTensor::BFloat16(t) => (
                DType::BFloat16,
                le(t, |v: BFloat16| {
                    ((f32::from(v).to_bits() >> 16) as u16).to_le_bytes()
                }),
            ),
            AnyTensor::UInt16(t) => (DType::UInt16, plain_bytes(t)),
            AnyTensor::Half(t) => (DType::Half, plain_bytes(t)),
            AnyTensor::UInt32(t) => (DType::UInt32, plain_bytes(t)),
            AnyTensor::UInt64(t) => (DType::UInt64, plain_bytes(t)),
            AnyTensor::String(t) => (
                DType::String,
                DenseData::Strings(t.iter().map(|s| s.0.clone()).collect()),
            ),
        };
        DenseTensor { dtype, dims, data }
    }
}
