//! Row matrices on the wire: f32 activations encoded as little-endian f32, f16 or bf16.

use half::{bf16, f16};
use latentserve_proto::v1::{Rows, WireDtype};

/// A payload that does not decode; the message says which count or size is off.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unknown wire dtype {0}")]
    UnknownDtype(i32),
    #[error("rows: {rows} x {cols} {dtype} values need {expected} bytes, got {found}")]
    Length {
        rows: usize,
        cols: usize,
        dtype: &'static str,
        expected: usize,
        found: usize,
    },
}

/// Bytes of one element.
pub fn dtype_size(dtype: WireDtype) -> usize {
    match dtype {
        WireDtype::F32 | WireDtype::Unspecified => 4,
        WireDtype::F16 | WireDtype::Bf16 => 2,
    }
}

/// The flag spelling of a dtype.
pub fn dtype_name(dtype: WireDtype) -> &'static str {
    match dtype {
        WireDtype::F32 | WireDtype::Unspecified => "f32",
        WireDtype::F16 => "f16",
        WireDtype::Bf16 => "bf16",
    }
}

/// Encodes `values`, (rows, cols) row-major, as `dtype`. f16/bf16 round to nearest even.
pub fn encode(values: &[f32], rows: usize, cols: usize, dtype: WireDtype) -> Rows {
    debug_assert_eq!(values.len(), rows * cols);
    let dtype = match dtype {
        WireDtype::Unspecified => WireDtype::F32,
        d => d,
    };
    let mut data = Vec::with_capacity(values.len() * dtype_size(dtype));
    match dtype {
        WireDtype::F32 | WireDtype::Unspecified => {
            values
                .iter()
                .for_each(|v| data.extend_from_slice(&v.to_le_bytes()));
        }
        WireDtype::F16 => values
            .iter()
            .for_each(|&v| data.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
        WireDtype::Bf16 => values
            .iter()
            .for_each(|&v| data.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
    }
    Rows {
        dtype: dtype as i32,
        rows: rows as u32,
        cols: cols as u32,
        data,
    }
}

/// Decodes a row matrix to f32, checking that the byte count matches its shape.
pub fn decode(rows: &Rows) -> Result<Vec<f32>, WireError> {
    let dtype = WireDtype::try_from(rows.dtype).map_err(|_| WireError::UnknownDtype(rows.dtype))?;
    let (n, cols) = (rows.rows as usize, rows.cols as usize);
    let size = dtype_size(dtype);
    let expected = n * cols * size;
    if rows.data.len() != expected {
        return Err(WireError::Length {
            rows: n,
            cols,
            dtype: dtype_name(dtype),
            expected,
            found: rows.data.len(),
        });
    }
    let values = match dtype {
        WireDtype::F32 | WireDtype::Unspecified => rows
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        WireDtype::F16 => rows
            .data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        WireDtype::Bf16 => rows
            .data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    };
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUES: [f32; 6] = [0.0, -1.5, 3.140625, 65504.0, 1e-3, -7.25e2];

    #[test]
    fn f32_round_trips_exactly() {
        let rows = encode(&VALUES, 2, 3, WireDtype::F32);
        assert_eq!(rows.data.len(), 24);
        assert_eq!(decode(&rows).unwrap(), VALUES.to_vec());
        // Unspecified means f32.
        let rows = encode(&VALUES, 2, 3, WireDtype::Unspecified);
        assert_eq!(rows.dtype, WireDtype::F32 as i32);
    }

    #[test]
    fn f16_and_bf16_halve_the_bytes_within_their_precision() {
        for (dtype, relative) in [
            (WireDtype::F16, 1.0 / 2048.0),
            (WireDtype::Bf16, 1.0 / 256.0),
        ] {
            let rows = encode(&VALUES, 3, 2, dtype);
            assert_eq!(rows.data.len(), 12, "{dtype:?}");
            let back = decode(&rows).unwrap();
            for (a, b) in VALUES.iter().zip(&back) {
                assert!(
                    (a - b).abs() <= a.abs() * relative,
                    "{dtype:?}: {a} came back as {b}"
                );
            }
        }
        // Values exactly representable survive unchanged.
        let exact = [1.5f32, -2.0, 0.25];
        assert_eq!(
            decode(&encode(&exact, 1, 3, WireDtype::Bf16)).unwrap(),
            exact
        );
        // The byte layout is little-endian: 1.0 in f16 is 0x3C00.
        assert_eq!(encode(&[1.0], 1, 1, WireDtype::F16).data, vec![0x00, 0x3C]);
    }

    #[test]
    fn a_short_payload_or_unknown_dtype_is_an_error() {
        let mut rows = encode(&VALUES, 2, 3, WireDtype::F16);
        rows.data.pop();
        assert_eq!(
            decode(&rows),
            Err(WireError::Length {
                rows: 2,
                cols: 3,
                dtype: "f16",
                expected: 12,
                found: 11
            })
        );
        rows.dtype = 9;
        assert_eq!(decode(&rows), Err(WireError::UnknownDtype(9)));
    }
}
