use super::*;

fn shaped(dtype: DType, dims: &[i64]) -> TensorProto {
    TensorProto {
        dtype: dtype.to_proto(),
        tensor_shape: Some(TensorShapeProto {
            dim: dims
                .iter()
                .map(|size| Dim {
                    size: *size,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        }),
        ..TensorProto::default()
    }
}

#[test]
fn tensor_content_round_trips_for_every_numeric_type() {
    for dtype in DType::ALL {
        let Some(size) = dtype.element_size() else {
            continue;
        };
        let mut proto = shaped(dtype, &[2, 3]);
        // Bools must be 0 or 1; everything else takes any byte pattern.
        let content: Vec<u8> = (0..6 * size).map(|i| (i % 2) as u8).collect();
        proto.tensor_content = Bytes::from(content.clone());
        let dense = decode(&proto).expect("valid tensor");
        assert_eq!(dense.dims, vec![2, 3]);
        assert_eq!(dense.data, DenseData::Bytes(Bytes::from(content)));
        assert_eq!(encode(dense), proto, "{}", dtype.name());
    }
}

#[test]
fn a_scalar_value_is_broadcast_to_the_whole_shape() {
    let mut proto = shaped(DType::Float, &[3]);
    proto.float_val = vec![1.5];
    let dense = decode(&proto).expect("valid tensor");
    let expected: Vec<u8> = [1.5f32; 3].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(dense.data, DenseData::Bytes(Bytes::from(expected)));
}

#[test]
fn fewer_values_repeat_the_last_and_none_means_zeros() {
    let mut proto = shaped(DType::Int64, &[4]);
    proto.int64_val = vec![7, 9];
    let dense = decode(&proto).expect("valid tensor");
    let expected: Vec<u8> = [7i64, 9, 9, 9]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(dense.data, DenseData::Bytes(Bytes::from(expected)));

    let zeros = decode(&shaped(DType::Int32, &[2])).expect("valid tensor");
    assert_eq!(zeros.data, DenseData::Bytes(Bytes::from(vec![0u8; 8])));
}

#[test]
fn narrow_integers_and_halves_come_from_int32_fields() {
    let mut proto = shaped(DType::Int8, &[2]);
    proto.int_val = vec![-1, 5];
    assert_eq!(
        decode(&proto).expect("valid").data,
        DenseData::Bytes(Bytes::from(vec![0xff, 5]))
    );
    let mut proto = shaped(DType::Half, &[1]);
    proto.half_val = vec![0x3c00]; // 1.0 in IEEE half precision
    assert_eq!(
        decode(&proto).expect("valid").data,
        DenseData::Bytes(Bytes::from(vec![0x00, 0x3c]))
    );
    let mut proto = shaped(DType::UInt16, &[1]);
    proto.int_val = vec![65535];
    assert_eq!(
        decode(&proto).expect("valid").data,
        DenseData::Bytes(Bytes::from(vec![0xff, 0xff]))
    );
}

#[test]
fn bools_are_normalised_to_zero_or_one() {
    let mut proto = shaped(DType::Bool, &[3]);
    proto.tensor_content = Bytes::from(vec![0, 7, 1]);
    assert_eq!(
        decode(&proto).expect("valid").data,
        DenseData::Bytes(Bytes::from(vec![0, 1, 1]))
    );
    let mut proto = shaped(DType::Bool, &[2]);
    proto.bool_val = vec![true, false];
    assert_eq!(
        decode(&proto).expect("valid").data,
        DenseData::Bytes(Bytes::from(vec![1, 0]))
    );
}

#[test]
fn strings_round_trip_and_broadcast() {
    let mut proto = shaped(DType::String, &[3]);
    proto.string_val = vec![b"a".to_vec(), b"\xff\x00binary".to_vec()];
    let dense = decode(&proto).expect("valid tensor");
    assert_eq!(
        dense.data,
        DenseData::Strings(vec![
            b"a".to_vec(),
            b"\xff\x00binary".to_vec(),
            b"\xff\x00binary".to_vec()
        ])
    );
}

#[test]
fn strings_in_tensor_content_decode_as_tensorflow_encodes_them() {
    // TensorFlow's C++ runtime (e.g. its MasterService client) sends a string tensor as
    // every length as a varint, then the bytes: here b"ab", 200 bytes of 'x', b"".
    let mut proto = shaped(DType::String, &[3]);
    let mut content = vec![2, 0xc8, 0x01, 0];
    content.extend_from_slice(b"ab");
    content.extend_from_slice(&[b'x'; 200]);
    proto.tensor_content = Bytes::from(content.clone());
    validate(&proto).expect("valid tensor");
    let dense = decode(&proto).expect("valid tensor");
    assert_eq!(
        dense.data,
        DenseData::Strings(vec![b"ab".to_vec(), vec![b'x'; 200], Vec::new()])
    );

    content.pop();
    proto.tensor_content = Bytes::from(content);
    let error = validate(&proto).expect_err("one byte short");
    assert!(
        matches!(error, TensorError::StringContent { .. }),
        "{error}"
    );
}

#[test]
fn a_missing_shape_is_a_scalar() {
    let proto = TensorProto {
        dtype: DType::Double.to_proto(),
        double_val: vec![2.0],
        ..TensorProto::default()
    };
    let dense = decode(&proto).expect("valid tensor");
    assert!(dense.dims.is_empty());
    assert_eq!(dense.element_count(), 1);
}

#[test]
fn content_length_must_match_shape_times_element_size() {
    let mut proto = shaped(DType::Float, &[2, 2]);
    proto.tensor_content = Bytes::from(vec![0u8; 12]);
    let error = validate(&proto).expect_err("12 bytes are not 4 floats");
    assert_eq!(
        error.to_string(),
        "tensor_content has 12 bytes, but shape [2, 2] of float32 needs 16 (4 elements × 4 bytes)"
    );
    assert_eq!(decode(&proto), Err(error));
}

#[test]
fn bad_dtypes_and_shapes_are_named() {
    let proto = TensorProto {
        dtype: 99,
        ..TensorProto::default()
    };
    assert_eq!(validate(&proto), Err(TensorError::UnsupportedDtype(99)));
    assert!(
        TensorError::UnsupportedDtype(99)
            .to_string()
            .starts_with("dtype 99 is not supported")
    );
    assert_eq!(
        validate(&TensorProto::default()),
        Err(TensorError::UnsupportedDtype(0))
    );

    let proto = shaped(DType::Float, &[2, -3]);
    assert_eq!(
        validate(&proto),
        Err(TensorError::NegativeDimension { index: 1, size: -3 })
    );

    let proto = shaped(DType::Float, &[i64::MAX, 4]);
    assert!(matches!(
        validate(&proto),
        Err(TensorError::TooManyElements { .. })
    ));

    let mut proto = shaped(DType::Float, &[1]);
    proto.tensor_shape.as_mut().expect("shape").unknown_rank = true;
    assert_eq!(validate(&proto), Err(TensorError::UnknownRank));
}

#[test]
fn a_huge_shape_with_one_value_is_rejected_not_allocated() {
    // 2^40 floats would be 4 TiB: decoding must fail cleanly instead of aborting the process.
    let mut proto = shaped(DType::Float, &[1 << 20, 1 << 20]);
    proto.float_val = vec![1.0];
    assert!(matches!(
        decode(&proto),
        Err(TensorError::TooManyElements { .. })
    ));
}

#[test]
fn values_in_the_wrong_field_or_too_many_are_rejected() {
    let mut proto = shaped(DType::Float, &[2]);
    proto.int_val = vec![1, 2];
    assert_eq!(
        validate(&proto),
        Err(TensorError::WrongValueField {
            dtype: "float32",
            expected: "float_val",
            found: "int_val"
        })
    );
    let mut proto = shaped(DType::Float, &[2]);
    proto.float_val = vec![1.0, 2.0, 3.0];
    assert!(matches!(
        validate(&proto),
        Err(TensorError::TooManyValues { count: 3, .. })
    ));
}

#[test]
fn reference_types_map_to_their_base_type() {
    assert_eq!(DType::from_proto(101), Ok(DType::Float));
    assert_eq!(
        DType::from_proto(120),
        Err(TensorError::UnsupportedDtype(120))
    );
}

#[test]
fn a_broadcast_value_counts_as_every_element_it_fills() {
    let mut huge = shaped(DType::Float, &[1 << 28]);
    huge.float_val = vec![1.0];
    assert_eq!(decoded_size(&huge), Ok(1 << 30));
    let mut content = shaped(DType::Int64, &[2, 3]);
    content.tensor_content = Bytes::from(vec![0u8; 48]);
    assert_eq!(decoded_size(&content), Ok(48));
    assert_eq!(decoded_size(&shaped(DType::Bool, &[0, 1 << 40])), Ok(0));
    assert_eq!(
        decoded_size(&shaped(DType::Double, &[1 << 62])),
        Ok(u64::MAX)
    );
}

#[test]
fn strings_count_their_bytes_and_a_header_each() {
    let mut strings = shaped(DType::String, &[4]);
    strings.string_val = vec![b"ab".to_vec(), b"xyz".to_vec()];
    // "ab", "xyz", then "xyz" twice more.
    assert_eq!(
        decoded_size(&strings),
        Ok(2 + 3 * 3 + 4 * STRING_ELEMENT_OVERHEAD)
    );
    let empty = shaped(DType::String, &[1 << 28]);
    assert_eq!(
        decoded_size(&empty),
        Ok((1 << 28) * STRING_ELEMENT_OVERHEAD)
    );
}

#[test]
fn shapes_past_tensorflows_rank_are_refused() {
    let deep = shaped(DType::Float, &vec![1; MAX_RANK + 1]);
    assert_eq!(
        validate(&deep),
        Err(TensorError::TooManyDimensions { rank: MAX_RANK + 1 })
    );
    assert!(validate(&shaped(DType::Float, &vec![1; MAX_RANK])).is_ok());
}
