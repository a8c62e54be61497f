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
    let parallelism = gemm::Parallelism::Rayon(threads);
    println!("y (n, {out_features}) = x (n, {in_features}) W^T, {threads} threads, GFLOP/s");
    println!(
        "{:>5} {:>8} {:>8} {:>18}",
        "n", "candle", "ours", "pre-transposed W"
    );
    for n in [32usize, 64, 128, 512] {
        let x: Vec<f32> = (0..n * in_features).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut y = vec![0f32; n * out_features];
        let flops = 2.0 * (n * in_features * out_features) as f64;
        let y_ptr = y.as_mut_ptr();
        // SAFETY (both unsafe blocks): every view lies inside its Vec (n x out for y, n x in for
        // x, out x in for w and wt), and y aliases neither input.
        let candle = gflops(flops, || unsafe {
            gemm::gemm(
                n,
                out_features,
                in_features,
                y_ptr,
                1,
                out_features as isize,
                false,
                x.as_ptr(),
                1,
                in_features as isize,
                w.as_ptr(),
                in_features as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        });
        let ours = gflops(flops, || {
            linear.forward_rows(&x, n).expect("forward_rows");
        });
        let pre_transposed = gflops(flops, || unsafe {
            gemm::gemm(
                n,
                out_features,
                in_features,
                y_ptr,
                1,
                out_features as isize,
                false,
                x.as_ptr(),
                1,
                in_features as isize,
                wt.as_ptr(),
                1,
                out_features as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        });
        println!("{n:>5} {candle:>8.1} {ours:>8.1} {pre_transposed:>18.1}");
    }
}
