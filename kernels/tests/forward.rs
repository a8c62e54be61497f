//! `Linear::forward` against a plain f64 reference, for every storage dtype and batch size.

use candle_core::{DType, Device, Tensor};
use half::f16;
use latentserve_kernels::{Isa, KernelError, Linear};

mod common;
use common::values;

/// y[r][o] = sum_i x[r][i] * w[o][i] in f64, with the weights as stored (f16-rounded for F16),
/// and the matching error scale sum_i |x[r][i] * w[o][i]|.
fn reference(
    x: &[f32],
    w: &[f32],
    n: usize,
    inp: usize,
    out: usize,
    dtype: DType,
) -> Vec<(f64, f64)> {
    let stored = |v: f32| -> f64 {
        match dtype {
            DType::F16 => f16::from_f32(v).to_f64(),
            _ => v as f64,
        }
    };
    let mut result = Vec::with_capacity(n * out);
    for r in 0..n {
        for o in 0..out {
            let (mut sum, mut scale) = (0.0f64, 0.0f64);
            for i in 0..inp {
                let term = x[r * inp + i] as f64 * stored(w[o * inp + i]);
                sum += term;
                scale += term.abs();
            }
            result.push((sum, scale));
        }
    }
    result
}

/// Which implementation a check runs.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// `forward`: kernels below GEMM_MIN_ROWS, gemm from there on.
    Dispatch,
    /// `forward_rows` on plain slices: the same split, no tensors.
    Rows,
    Kernel(Isa),
    Gemm,
}

fn run(linear: &Linear, input: &Tensor, path: Path) -> Tensor {
    match path {
        Path::Dispatch => linear.forward(input),
        Path::Rows => {
            let n = input.dim(0).unwrap();
            let x = input.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = linear.forward_rows(&x, n).unwrap();
            Ok(Tensor::from_vec(y, (n, linear.out_features()), input.device()).unwrap())
        }
        Path::Kernel(isa) => linear.forward_kernel(input, isa),
        Path::Gemm => linear.forward_gemm(input),
    }
    .unwrap()
}

/// Checks `values` ((n, out) row-major) against the f64 reference of `x` and `w`.
fn assert_close(
    values: &[f32],
    x: &[f32],
    w: &[f32],
    shape: (usize, usize, usize),
    dtype: DType,
    what: &str,
) {
    let (n, inp, out) = shape;
    for (index, (&value, &(expected, scale))) in values
        .iter()
        .zip(&reference(x, w, n, inp, out, dtype))
        .enumerate()
    {
        // f32 accumulation of `inp` terms: the error is a small multiple of eps * sum |terms|.
        let tolerance = 1e-5 * scale.max(1e-30);
        assert!(
            (value as f64 - expected).abs() <= tolerance,
            "{what} {dtype:?} n={n} in={inp} out={out} element {index}: got {value}, expected {expected} (tolerance {tolerance:e})"
        );
    }
}

fn check(n: usize, inp: usize, out: usize, dtype: DType, path: Path) {
    let w = values(1 + (inp * 31 + out) as u64, out * inp);
    let x = values(7 + n as u64, n * inp);
    let weight = Tensor::from_slice(&w, (out, inp), &Device::Cpu).unwrap();
    let linear = Linear::new(&weight, dtype).unwrap();
    let input = Tensor::from_slice(&x, (n, inp), &Device::Cpu).unwrap();
    let y = run(&linear, &input, path);
    assert_eq!(y.dims(), &[n, out]);
    assert_eq!(y.dtype(), DType::F32);
    let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_close(&got, &x, &w, (n, inp, out), dtype, &format!("{path:?}"));
}

/// Every path this CPU can run; the scalar kernel is always among them.
fn paths() -> Vec<Path> {
    let mut paths = vec![Path::Dispatch, Path::Rows, Path::Gemm];
    paths.extend(Isa::supported().into_iter().map(Path::Kernel));
    paths
}

#[test]
fn matches_f64_reference_for_every_dtype_and_batch() {
    for dtype in [DType::F32, DType::F16] {
        for path in paths() {
            for n in [1, 2, 3, 4, 7, 16, 33] {
                // Sizes off the vector width and the row blocking, one wide enough to be split
                // over threads, and a single input feature.
                for (inp, out) in [(1000, 37), (64, 64), (1, 5), (257, 129), (1024, 300)] {
                    check(n, inp, out, dtype, path);
                }
            }
        }
    }
}

#[test]
fn reports_shape_dtype_and_bytes() {
    let weight = Tensor::zeros((37, 1000), DType::BF16, &Device::Cpu).unwrap();
    let f32_linear = Linear::new(&weight, DType::F32).unwrap();
    assert_eq!(
        (f32_linear.out_features(), f32_linear.in_features()),
        (37, 1000)
    );
    assert_eq!(f32_linear.dtype(), DType::F32);
    assert_eq!(f32_linear.weight_bytes(), 37 * 1000 * 4);
    let f16_linear = Linear::new(&weight, DType::F16).unwrap();
    assert_eq!(f16_linear.dtype(), DType::F16);
    assert_eq!(f16_linear.weight_bytes(), 37 * 1000 * 2);
}

#[test]
fn rejects_bad_weights_and_inputs() {
    let weight = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        Linear::new(&weight, DType::BF16),
        Err(KernelError::UnsupportedStorageDtype(DType::BF16))
    ));
    let cube = Tensor::zeros((2, 4, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        Linear::new(&cube, DType::F32),
        Err(KernelError::WeightRank(dims)) if dims == [2, 4, 8]
    ));
    let ints = Tensor::zeros((4, 8), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        Linear::new(&ints, DType::F32),
        Err(KernelError::WeightNotFloat(DType::U32))
    ));

    let linear = Linear::new(&weight, DType::F32).unwrap();
    let wrong_width = Tensor::zeros((3, 7), DType::F32, &Device::Cpu).unwrap();
    let error = linear.forward(&wrong_width).unwrap_err();
    assert!(matches!(&error, KernelError::InputShape { expected_in: 8, got } if got == &[3, 7]));
    assert_eq!(error.to_string(), "input has shape [3, 7]: expected (n, 8)");
    let vector = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        linear.forward(&vector),
        Err(KernelError::InputShape { .. })
    ));
    let half_input = Tensor::zeros((1, 8), DType::F16, &Device::Cpu).unwrap();
    assert!(matches!(
        linear.forward(&half_input),
        Err(KernelError::InputDtype(DType::F16))
    ));
}

#[test]
fn accepts_strided_input_and_empty_batch() {
    let w = values(3, 6 * 10);
    let weight = Tensor::from_slice(&w, (6, 10), &Device::Cpu).unwrap();
    let linear = Linear::new(&weight, DType::F32).unwrap();
    // (10, 4) transposed to (4, 10): not contiguous.
    let x = Tensor::from_slice(&values(5, 40), (10, 4), &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    let strided = linear.forward(&x).unwrap().to_vec2::<f32>().unwrap();
    let dense = linear
        .forward(&x.contiguous().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(strided, dense);

    let empty = Tensor::zeros((0, 10), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(linear.forward(&empty).unwrap().dims(), &[0, 6]);
}

#[test]
fn simd_kernels_agree_with_the_scalar_kernel() {
    let (n, inp, out) = (5, 1000, 37);
    for dtype in [DType::F32, DType::F16] {
        let weight = Tensor::from_slice(&values(11, out * inp), (out, inp), &Device::Cpu).unwrap();
        let linear = Linear::new(&weight, dtype).unwrap();
        let input = Tensor::from_slice(&values(13, n * inp), (n, inp), &Device::Cpu).unwrap();
        let scalar = run(&linear, &input, Path::Kernel(Isa::Scalar))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for isa in Isa::supported() {
            let simd = run(&linear, &input, Path::Kernel(isa))
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (index, (a, b)) in scalar.iter().zip(&simd).enumerate() {
                // Same terms summed in a different order: a few ulps of sum |terms| (<= in).
                assert!(
                    (a - b).abs() <= 1e-5 * inp as f32,
                    "{isa} {dtype:?} element {index}: {b} against scalar {a}"
                );
            }
        }
    }
}

#[test]
fn forward_many_matches_forward_for_each_pair() {
    // Mixed dtypes, widths and batch sizes (one at the gemm threshold), as for MoE experts.
    let shapes = [
        (40, 100, 3, DType::F32),
        (300, 64, 1, DType::F16),
        (17, 33, 40, DType::F32),
        (8, 8, 0, DType::F16),
    ];
    let mut linears = Vec::new();
    let mut inputs = Vec::new();
    for (index, &(out, inp, n, dtype)) in shapes.iter().enumerate() {
        let weight = Tensor::from_slice(
            &values(20 + index as u64, out * inp),
            (out, inp),
            &Device::Cpu,
        )
        .unwrap();
        linears.push(Linear::new(&weight, dtype).unwrap());
        inputs.push(
            Tensor::from_slice(&values(30 + index as u64, n * inp), (n, inp), &Device::Cpu)
                .unwrap(),
        );
    }
    let pairs: Vec<(&Linear, &Tensor)> = linears.iter().zip(&inputs).collect();
    let outputs = Linear::forward_many(&pairs).unwrap();
    assert_eq!(outputs.len(), shapes.len());
    for ((linear, input), output) in pairs.iter().zip(&outputs) {
        let single = linear.forward(input).unwrap();
        assert_eq!(output.dims(), single.dims());
        assert_eq!(
            output.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            single.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    let wrong = Tensor::zeros((1, 7), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        Linear::forward_many(&[(&linears[0], &wrong)]),
        Err(KernelError::InputShape {
            expected_in: 100,
            ..
        })
    ));
}

#[test]
fn unsupported_isa_is_an_error() {
    let weight = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
    let linear = Linear::new(&weight, DType::F32).unwrap();
    let input = Tensor::zeros((1, 8), DType::F32, &Device::Cpu).unwrap();
    for isa in Isa::ALL {
        let result = linear.forward_kernel(&input, isa);
        assert_eq!(result.is_ok(), isa.is_supported(), "{isa}");
    }
    assert!(Isa::detect().is_supported());
}
