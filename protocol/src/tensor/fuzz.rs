//! Property tests ("fuzzing" within the stable toolchain) for the tensor codec: arbitrary
//! TensorProtos, and arbitrary bytes parsed as one, never panic or over-allocate; whatever
//! `validate` accepts, `decode` accepts with exactly shape × dtype bytes, and encoding that
//! gives back the same tensor. The seeds in `protocol/tests/corpus/tensor/` (TensorProtos as
//! TensorFlow writes them, and malformed ones) run first; proptest keeps any failure it
//! finds in `proptest-regressions/` next to this file, and CI re-runs them.
//! `PROPTEST_CASES` bounds the pass (256 cases per property by default).

use proptest::prelude::*;
use prost::Message;

use super::*;

/// Any dtype number, mostly valid ones.
fn dtype() -> impl Strategy<Value = i32> {
    prop_oneof![
        8 => prop::sample::select(DType::ALL.map(DType::to_proto).to_vec()),
        1 => any::<i32>(),
        1 => 100..125i32,
    ]
}

/// Shapes: mostly small and valid, sometimes negative, unknown-rank or enormous.
fn shape() -> impl Strategy<Value = Option<TensorShapeProto>> {
    let dims = prop_oneof![
        8 => prop::collection::vec(0i64..6, 0..4),
        1 => prop::collection::vec(any::<i64>(), 0..4),
        1 => prop::collection::vec(prop_oneof![Just(i64::MAX), Just(1 << 40), Just(-1)], 1..3),
    ];
    (
        prop::option::weighted(0.9, dims),
        any::<bool>(),
        any::<u8>(),
    )
        .prop_map(|(dims, unknown, coin)| {
            dims.map(|dims| TensorShapeProto {
                dim: dims
                    .into_iter()
                    .map(|size| Dim {
                        size,
                        name: String::new(),
                    })
                    .collect(),
                unknown_rank: unknown && coin < 16,
            })
        })
}

fn tensor_proto() -> impl Strategy<Value = TensorProto> {
    let values = (
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(any::<f32>(), 0..6),
        prop::collection::vec(any::<i32>(), 0..6),
        prop::collection::vec(any::<i64>(), 0..6),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..5), 0..6),
        prop::collection::vec(any::<bool>(), 0..6),
        prop::collection::vec(any::<f64>(), 0..6),
    );
    (dtype(), shape(), values, 0u8..8).prop_map(
        |(dtype, tensor_shape, (content, floats, ints, int64s, strings, bools, doubles), pick)| {
            let mut proto = TensorProto {
                dtype,
                tensor_shape,
                ..TensorProto::default()
            };
            // Usually one value field, sometimes a wrong one or two at once.
            match pick {
                0 => proto.tensor_content = Bytes::from(content),
                1 => proto.float_val = floats,
                2 => proto.int_val = ints,
                3 => proto.int64_val = int64s,
                4 => proto.string_val = strings,
                5 => proto.bool_val = bools,
                6 => proto.double_val = doubles,
                _ => {
                    proto.half_val = ints;
                    proto.uint64_val = vec![1, 2];
                }
            }
            proto
        },
    )
}

/// Checks every invariant of the codec on one tensor.
fn check(proto: &TensorProto) {
    let validated = validate(proto);
    let decoded = decode(proto);
    match (&validated, &decoded) {
        (Ok(()), Ok(dense)) => {
            let elements = dense.element_count();
            match (&dense.data, dense.dtype.element_size()) {
                (DenseData::Bytes(bytes), Some(size)) => {
                    assert_eq!(bytes.len() as u64, elements * size as u64)
                }
                (DenseData::Strings(strings), None) => {
                    assert_eq!(strings.len() as u64, elements)
                }
                other => panic!("data does not match the dtype: {other:?}"),
            }
            let again = decode(&encode(dense.clone())).expect("an encoded tensor decodes");
            assert_eq!(&again, dense);
        }
        // Decoding may fail where validating did not only for lack of memory.
        (Ok(()), Err(TensorError::TooManyElements { .. })) => {}
        (Err(validation), Err(decoding)) => assert_eq!(validation, decoding),
        other => panic!("validate and decode disagree: {other:?}"),
    }
}

/// Keeps generated shapes to at most a million elements where a property needs to decode
/// (the allocation itself is covered by `a_huge_shape_with_one_value_is_rejected_not_allocated`).
fn small(proto: &TensorProto) -> bool {
    let Some(shape) = &proto.tensor_shape else {
        return true;
    };
    shape
        .dim
        .iter()
        .try_fold(1u64, |total, dim| {
            u64::try_from(dim.size)
                .ok()
                .and_then(|size| total.checked_mul(size))
        })
        .is_none_or(|elements| elements <= 1 << 20)
}

proptest! {
    #[test]
    fn the_codec_holds_its_invariants(proto in tensor_proto()) {
        if small(&proto) {
            check(&proto);
        } else {
            // Enormous shapes must be refused or at least not panic.
            let _ = validate(&proto);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(proto) = TensorProto::decode(bytes.as_slice())
            && small(&proto)
        {
            check(&proto);
        }
    }
}

#[test]
fn the_seed_corpus_decodes_as_recorded() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/tensor");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/corpus/tensor") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("seed");
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        match TensorProto::decode(bytes.as_slice()) {
            Ok(proto) => {
                check(&proto);
                // Seeds named valid-* must decode; invalid-* must be refused.
                if name.starts_with("valid-") {
                    assert!(decode(&proto).is_ok(), "{name}");
                } else if name.starts_with("invalid-") {
                    assert!(validate(&proto).is_err(), "{name}");
                }
            }
            Err(_) => assert!(name.starts_with("garbage-"), "{name} does not parse"),
        }
        seen += 1;
    }
    assert!(seen >= 8, "the corpus has {seen} seeds");
}
