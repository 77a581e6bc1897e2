//! Helpers shared by the models crate's integration tests.
#![allow(dead_code)] // each test crate uses its own share of these

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// The largest absolute element-wise difference of two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// A tensor stored by the golden scripts as `{"shape": [...], "values": [...]}`.
pub fn golden_tensor(v: &Value) -> Tensor {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let values: Vec<f32> = v["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap()
}

/// The largest difference relative to the reference's largest magnitude.
pub fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    let diff: f32 = (got.to_dtype(DType::F32).unwrap() - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    diff / scale.max(1e-6)
}
