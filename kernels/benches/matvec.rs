//! Matrix-vector and small-batch projection throughput: our kernels against candle's matmul on
//! the projection shapes of the standard benchmark model, and a 2-thread memory read as the
//! ceiling. Run with `cargo bench -p latentserve-kernels`.
//!
//! Every timed call reads a different copy of the weights, cycling through at least
//! `WORKING_SET_BYTES`, so that the figures are for weights streamed from memory as in a decode
//! step of the whole model, not for one matrix that stays in cache.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use latentserve_kernels::{Isa, Linear};
use rayon::prelude::*;

const WORKING_SET_BYTES: usize = 1 << 30;
/// Timed batches per figure; the median batch is reported (the machine is shared).
const BATCHES: usize = 7;
const BATCH_TIME: Duration = Duration::from_millis(40);

/// (out_features, in_features) of the standard model's projections.
const SHAPES: [(usize, usize, &str); 6] = [
    (1024, 1024, "square"),
    (2816, 1024, "dense up/gate"),
    (1024, 2816, "dense down"),
    (512, 1024, "q_a / expert up"),
    (1024, 512, "expert down"),
    (32000, 1024, "lm_head"),
];

fn main() {
    let threads = rayon::current_num_threads();
    println!(
        "latentserve-kernels bench: isa {}, {threads} rayon threads, working set {} MiB",
        Isa::detect(),
        WORKING_SET_BYTES >> 20
    );
    let ceiling = read_bandwidth();
    println!("memory read ceiling ({threads} threads, 1 GiB array): {ceiling:.1} GB/s\n");

    println!(
        "{:<16} {:>11} {:>5} {:>3} | {:>9} {:>8} | {:>9} {:>8} | {:>8} {:>10}",
        "projection",
        "out x in",
        "dtype",
        "n",
        "ours GB/s",
        "ours us",
        "candle",
        "cand. us",
        "vs cand.",
        "of ceiling"
    );
    for (out_features, in_features, name) in SHAPES {
        for dtype in [DType::F32, DType::F16] {
            let copies = weight_copies(out_features, in_features, dtype);
            for n in [1, 4, 16] {
                let x = input(n, in_features);
                let bytes = copies[0].0.weight_bytes() as f64;
                let ours = time_per_call(&copies, |(linear, _)| {
                    linear.forward_kernel(&x, Isa::detect()).expect("kernel")
                });
                let candle = time_per_call(&copies, |(_, weight)| candle_peer(weight, &x));
                let ours_gbps = bytes / ours.as_secs_f64() / 1e9;
                let candle_gbps = bytes / candle.as_secs_f64() / 1e9;
                println!(
                    "{:<16} {:>11} {:>5} {:>3} | {:>9.1} {:>8.1} | {:>9.1} {:>8.1} | {:>7.2}x {:>9.0}%",
                    name,
                    format!("{out_features}x{in_features}"),
                    format!("{dtype:?}").to_lowercase(),
                    n,
                    ours_gbps,
                    ours.as_secs_f64() * 1e6,
                    candle_gbps,
                    candle.as_secs_f64() * 1e6,
                    candle.as_secs_f64() / ours.as_secs_f64(),
                    100.0 * ours_gbps / ceiling,
                );
            }
        }
    }

    println!("\nkernel vs gemm by batch size (2816x1024): time per call in us");
    println!(
        "{:>5} {:>4} | {:>9} {:>9} | {:>7}",
        "dtype", "n", "kernel", "gemm", "gemm/kernel"
    );
    for dtype in [DType::F32, DType::F16] {
        let copies = weight_copies(2816, 1024, dtype);
        for n in [8, 16, 24, 32, 48, 64, 128] {
            let x = input(n, 1024);
            let kernel = time_per_call(&copies, |(linear, _)| {
                linear.forward_kernel(&x, Isa::detect()).expect("kernel")
            });
            let gemm = time_per_call(&copies, |(linear, _)| {
                linear.forward_gemm(&x).expect("gemm")
            });
            println!(
                "{:>5} {:>4} | {:>9.1} {:>9.1} | {:>10.2}",
                format!("{dtype:?}").to_lowercase(),
                n,
                kernel.as_secs_f64() * 1e6,
                gemm.as_secs_f64() * 1e6,
                gemm.as_secs_f64() / kernel.as_secs_f64()
            );
        }
    }

    println!("\nper ISA, 1024x1024 n=1 (GB/s; weights streamed from memory)");
    for dtype in [DType::F32, DType::F16] {
        let copies = weight_copies(1024, 1024, dtype);
        let x = input(1, 1024);
        let bytes = copies[0].0.weight_bytes() as f64;
        for isa in Isa::supported() {
            let time = time_per_call(&copies, |(linear, _)| {
                linear.forward_kernel(&x, isa).expect("kernel")
            });
            println!(
                "{:>5} {:<7} {:>7.1} GB/s {:>8.1} us",
                format!("{dtype:?}").to_lowercase(),
                isa.to_string(),
                bytes / time.as_secs_f64() / 1e9,
                time.as_secs_f64() * 1e6
            );
        }
    }
}

/// candle's own best for this dtype: an f32 matmul, or an f16 matmul on f16 inputs.
fn candle_peer(weight: &Tensor, x: &Tensor) -> Tensor {
    let result = match weight.dtype() {
        DType::F32 => x.matmul(&weight.t().expect("t")),
        _ => x
            .to_dtype(weight.dtype())
            .and_then(|x| x.matmul(&weight.t()?))
            .and_then(|y| y.to_dtype(DType::F32)),
    };
    result.expect("candle matmul")
}

/// Enough copies of one random (out, in) weight to fill the working set, each as a Linear and
/// as the candle tensor of the same dtype (sharing its memory).
fn weight_copies(out_features: usize, in_features: usize, dtype: DType) -> Vec<(Linear, Tensor)> {
    let weight = Tensor::randn(0f32, 0.02, (out_features, in_features), &Device::Cpu)
        .and_then(|w| w.to_dtype(dtype))
        .expect("random weight");
    let bytes = out_features * in_features * dtype.size_in_bytes();
    let count = WORKING_SET_BYTES.div_ceil(bytes).max(2);
    (0..count)
        .map(|_| {
            // `copy` gives each its own storage, so every call streams fresh memory.
            let copy = weight.copy().expect("copy");
            let linear = Linear::new(&copy, dtype).expect("linear");
            (linear, copy)
        })
        .collect()
}

fn input(n: usize, in_features: usize) -> Tensor {
    Tensor::randn(0f32, 1.0, (n, in_features), &Device::Cpu).expect("random input")
}

/// Median time of one call over `BATCHES` timed batches, each cycling through the copies.
fn time_per_call<T>(copies: &[T], mut call: impl FnMut(&T) -> Tensor) -> Duration {
    for copy in copies.iter().take(3) {
        black_box(call(copy));
    }
    let mut per_call = Vec::with_capacity(BATCHES);
    let mut next = 0;
    for _ in 0..BATCHES {
        let start = Instant::now();
        let mut calls = 0u32;
        while start.elapsed() < BATCH_TIME || calls < copies.len() as u32 {
            black_box(call(&copies[next]));
            next = (next + 1) % copies.len();
            calls += 1;
        }
        per_call.push(start.elapsed() / calls);
    }
    per_call.sort();
    per_call[BATCHES / 2]
}

/// GB/s of summing a 1 GiB array split over rayon's threads (best of several passes).
fn read_bandwidth() -> f64 {
    let words: Vec<u64> = (0..(1usize << 27) as u64).collect();
    let bytes = (words.len() * 8) as f64;
    let per_thread = words.len() / rayon::current_num_threads();
    (0..BATCHES)
        .map(|_| {
            let start = Instant::now();
            let sum: u64 = words
                .par_chunks(per_thread)
                .map(|chunk| chunk.iter().fold(0u64, |acc, &v| acc.wrapping_add(v)))
                .reduce(|| 0, u64::wrapping_add);
            black_box(sum);
            bytes / start.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}
