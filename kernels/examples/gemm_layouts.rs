//! Why `Linear`'s prefill product calls `gemm` the way it does (see `src/gemm.rs`): the same
//! product `y (n, out) = x (n, in) W^T`, `W (out, in)` row-major as our weights are stored,
//! handed to `gemm` with different operand layouts. Prints GFLOP/s, best of 10, with rayon's
//! threads (`RAYON_NUM_THREADS`).
//!
//!     cargo run --release -p latentserve-kernels --example gemm_layouts
//!
//! - "candle": what `x.matmul(&W.t())` passes (row-major y, W^T as a strided view), so `gemm`
//!   repacks W from rows into its panels in every call;
//! - "ours": x transposed to column-major, y produced column-major and transposed back, the two
//!   transposes included in the time (`Linear::forward_rows`);
//! - "pre-transposed W": a W^T stored once in (in, out), the best `gemm` gets, for reference (it
//!   would double the weights' memory or slow down the decode kernels, which read rows of W).

use std::time::Instant;

use latentserve_kernels::Linear;

fn gflops(flops: f64, mut run: impl FnMut()) -> f64 {
    run();
    let mut best = f64::MAX;
    for _ in 0..10 {
        let started = Instant::now();
        run();
        best = best.min(started.elapsed().as_secs_f64());
    }
    flops / best / 1e9
}

/// `y (n, out) = x (n, in) R` for a right operand `R (in, out)` read from `r` with
/// `(row, column)` strides, row-major `y` and `x`, as candle's matmul calls gemm.
fn product(
    y: &mut [f32],
    x: &[f32],
    n: usize,
    in_features: usize,
    r: &[f32],
    r_strides: (usize, usize),
) {
    let out_features = y.len() / n;
    assert_eq!(x.len(), n * in_features);
    assert_eq!(r.len(), in_features * out_features);
    // SAFETY: y is (n, out) and x (n, in) row-major inside their slices; both r layouts used
    // here ((1, in) for W^T of a row-major W, (out, 1) for a row-major W^T) address exactly the
    // in * out elements of r; y aliases neither input.
    unsafe {
        gemm::gemm(
            n,
            out_features,
            in_features,
            y.as_mut_ptr(),
            1,
            out_features as isize,
            false,
            x.as_ptr(),
            1,
            in_features as isize,
            r.as_ptr(),
            r_strides.1 as isize,
            r_strides.0 as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        )
    }
}

fn main() {
    let (in_features, out_features) = (1024usize, 1024usize);
    let w: Vec<f32> = (0..out_features * in_features)
        .map(|i| (i % 5) as f32 * 0.1)
        .collect();
    let mut wt = vec![0f32; in_features * out_features];
    for o in 0..out_features {
        for k in 0..in_features {
            wt[k * out_features + o] = w[o * in_features + k];
        }
    }
    let weight =
        candle_core::Tensor::from_slice(&w, (out_features, in_features), &candle_core::Device::Cpu)
            .expect("weight tensor");
    let linear = Linear::new(&weight, candle_core::DType::F32).expect("linear");
    let threads = rayon::current_num_threads();
    println!("y (n, {out_features}) = x (n, {in_features}) W^T, {threads} threads, GFLOP/s");
    println!(
        "{:>5} {:>8} {:>8} {:>18}",
        "n", "candle", "ours", "pre-transposed W"
    );
    for n in [32usize, 64, 128, 512] {
        let x: Vec<f32> = (0..n * in_features).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut y = vec![0f32; n * out_features];
        let flops = 2.0 * (n * in_features * out_features) as f64;
        // W as gemm's right operand (in, out): the transposed view of W (candle's way), or the
        // pre-transposed copy.
        let candle = gflops(flops, || {
            product(&mut y, &x, n, in_features, &w, (1, in_features))
        });
        let ours = gflops(flops, || {
            linear.forward_rows(&x, n).expect("forward_rows");
        });
        let pre_transposed = gflops(flops, || {
            product(&mut y, &x, n, in_features, &wt, (out_features, 1))
        });
        println!("{n:>5} {candle:>8.1} {ours:>8.1} {pre_transposed:>18.1}");
    }
}
