//! `f32` rows ⇄ [`Tensor`]: activations and partial sums cross the wire as little-endian
//! `f32` bytes with an explicit shape.

use bytes::Bytes;

use crate::v1::{Dtype, Tensor};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    #[error("{name}: missing")]
    Missing { name: &'static str },
    #[error("{name}: dtype {got} is not supported, expected F32")]
    Dtype { name: &'static str, got: String },
    #[error("{name}: shape {got:?}, expected [tokens, {hidden}]")]
    Shape { name: &'static str, got: Vec<u64>, hidden: usize },
    #[error("{name}: {bytes} bytes do not fill shape {shape:?} of F32 ({expected} bytes)")]
    Length { name: &'static str, shape: Vec<u64>, bytes: usize, expected: usize },
}

/// Packs `rows` rows of `hidden` values as a `[rows, hidden]` F32 tensor.
pub fn from_f32(values: &[f32], hidden: usize) -> Tensor {
    let rows = values.len().checked_div(hidden).unwrap_or(0);
    pack(values.chunks_exact(hidden.max(1)), rows, hidden)
}

/// Packs the rows `rows` of `x` (`hidden` wide) as a `[rows.len(), hidden]` F32 tensor,
/// gathering them straight into the message bytes.
pub fn from_rows(x: &[f32], hidden: usize, rows: &[u32]) -> Tensor {
    let picked = rows.iter().map(|&r| &x[r as usize * hidden..(r as usize + 1) * hidden]);
    pack(picked, rows.len(), hidden)
}

fn pack<'a>(rows: impl Iterator<Item = &'a [f32]>, n: usize, hidden: usize) -> Tensor {
    let mut data = Vec::with_capacity(n * hidden * 4);
    for row in rows {
        // The wire is little-endian, as the machines are: a row's bytes go as they lie.
        #[cfg(target_endian = "little")]
        data.extend_from_slice(bytemuck::cast_slice(row));
        #[cfg(target_endian = "big")]
        row.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes()));
    }
    Tensor { dtype: Dtype::F32 as i32, shape: vec![n as u64, hidden as u64], data: Bytes::from(data) }
}

/// Unpacks a `[rows, hidden]` F32 tensor named `name` (for errors), checking dtype, shape
/// and length. Returns the values and the row count.
pub fn to_f32(t: Option<&Tensor>, name: &'static str, hidden: usize) -> Result<(Vec<f32>, usize), TensorError> {
    let t = t.ok_or(TensorError::Missing { name })?;
    if t.dtype != Dtype::F32 as i32 {
        let got = Dtype::try_from(t.dtype).map_or_else(|_| format!("#{}", t.dtype), |d| d.as_str_name().to_string());
        return Err(TensorError::Dtype { name, got });
    }
    let [rows, width] = t.shape[..] else {
        return Err(TensorError::Shape { name, got: t.shape.clone(), hidden });
    };
    if width as usize != hidden {
        return Err(TensorError::Shape { name, got: t.shape.clone(), hidden });
    }
    let expected = (rows as usize).saturating_mul(hidden).saturating_mul(4);
    if t.data.len() != expected {
        return Err(TensorError::Length { name, shape: t.shape.clone(), bytes: t.data.len(), expected });
    }
    let mut values = vec![0.0f32; expected / 4];
    // One copy (the message's bytes need not be aligned for f32).
    #[cfg(target_endian = "little")]
    bytemuck::cast_slice_mut::<f32, u8>(&mut values).copy_from_slice(&t.data);
    #[cfg(target_endian = "big")]
    for (v, b) in values.iter_mut().zip(t.data.chunks_exact(4)) {
        *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok((values, rows as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_tensors() {
        let v = [1.0f32, -2.5, 3.25, 0.0, f32::MIN_POSITIVE, 7.0];
        let t = from_f32(&v, 3);
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(to_f32(Some(&t), "x", 3), Ok((v.to_vec(), 2)));
        assert_eq!(to_f32(Some(&from_rows(&v, 3, &[1])), "x", 3), Ok((v[3..].to_vec(), 1)));
        assert!(matches!(to_f32(Some(&t), "x", 2), Err(TensorError::Shape { .. })));
        assert!(matches!(to_f32(None, "x", 3), Err(TensorError::Missing { .. })));
        let mut short = t.clone();
        short.data = short.data.slice(..20);
        assert!(matches!(to_f32(Some(&short), "x", 3), Err(TensorError::Length { .. })));
        let mut bf16 = t;
        bf16.dtype = Dtype::Bf16 as i32;
        assert_eq!(
            to_f32(Some(&bf16), "x", 3).unwrap_err().to_string(),
            "x: dtype DTYPE_BF16 is not supported, expected F32"
        );
    }
}
