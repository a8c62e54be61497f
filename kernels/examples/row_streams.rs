//! How few-input products should walk the weight rows, measured: interleaved blocks of 4 rows
//! (the kernels' layout for many inputs, each row prefetched 1 KiB ahead as f16 rows were)
//! against one row at a time with a software prefetch ahead of it (what `project` now does
//! for one input, and for up to four with f16 rows). AVX-512 only; two threads each stream
//! their half of every matrix in a 1 GiB working set, best of 5 passes.
//!
//!     cargo run --release -p latentserve-kernels --example row_streams [ROWS IN]
//!
//! Not the product code: a copy of the two loop shapes stripped to the arithmetic, so that the
//! layouts can be compared on a new machine without rebuilding the crate.

#[cfg(target_arch = "x86_64")]
mod layouts {
    use std::arch::x86_64::*;
    use std::time::Instant;

    pub trait Stored: Copy + Send + Sync + 'static {
        const NAME: &'static str;
        fn from_f32(value: f32) -> Self;
        /// # Safety
        /// 16 elements from `ptr` must be readable and the CPU must support AVX-512F.
        unsafe fn load16(ptr: *const Self) -> __m512;
    }

    impl Stored for f32 {
        const NAME: &'static str = "f32";
        fn from_f32(value: f32) -> Self {
            value
        }
        #[inline(always)]
        unsafe fn load16(ptr: *const Self) -> __m512 {
            // SAFETY: forwarded from the caller.
            unsafe { _mm512_loadu_ps(ptr) }
        }
    }

    impl Stored for half::f16 {
        const NAME: &'static str = "f16";
        fn from_f32(value: f32) -> Self {
            half::f16::from_f32(value)
        }
        #[inline(always)]
        unsafe fn load16(ptr: *const Self) -> __m512 {
            // SAFETY: forwarded from the caller.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(ptr.cast())) }
        }
    }

    type Product<E> = unsafe fn(&[E], usize, &[f32], &mut [f32]);

    /// `out[r * B + b] = w[r] . x[b]`, `R` rows x `V` vectors per step, prefetching `AHEAD`
    /// bytes past each row's position (0: none).
    ///
    /// # Safety
    /// AVX-512F; `w` is (out.len() / B, k), `x` is (B, k), k a multiple of 16 * V.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // register tiles read best indexed
    unsafe fn product<
        E: Stored,
        const R: usize,
        const V: usize,
        const B: usize,
        const AHEAD: usize,
    >(
        w: &[E],
        k: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        let rows = out.len() / B;
        for first in (0..rows - rows % R).step_by(R) {
            let base = w[first * k..].as_ptr();
            let mut acc = [[[_mm512_setzero_ps(); B]; V]; R];
            for i in (0..k).step_by(16 * V) {
                if AHEAD > 0 {
                    for j in 0..R {
                        let line = base.wrapping_add(j * k + i).cast::<i8>();
                        _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(AHEAD));
                    }
                }
                for v in 0..V {
                    // SAFETY: i + 16 * (v + 1) <= k, inside input b and row first + j.
                    unsafe {
                        let inputs: [__m512; B] = std::array::from_fn(|b| {
                            _mm512_loadu_ps(x.as_ptr().add(b * k + i + v * 16))
                        });
                        for j in 0..R {
                            let weights = E::load16(base.add(j * k + i + v * 16));
                            for b in 0..B {
                                acc[j][v][b] = _mm512_fmadd_ps(weights, inputs[b], acc[j][v][b]);
                            }
                        }
                    }
                }
            }
            for j in 0..R {
                for b in 0..B {
                    let sum = (1..V).fold(acc[j][0][b], |s, v| _mm512_add_ps(s, acc[j][v][b]));
                    out[(first + j) * B + b] = _mm512_reduce_add_ps(sum);
                }
            }
        }
    }

    fn gbps<E: Stored>(f: Product<E>, matrices: &[Vec<E>], rows: usize, k: usize, n: usize) -> f64 {
        let x: Vec<f32> = (0..k * n).map(|i| (i as f32 * 1e-3).sin()).collect();
        let bytes: usize = matrices
            .iter()
            .map(|m| std::mem::size_of_val(m.as_slice()))
            .sum();
        let half = rows / 2;
        (0..5)
            .map(|_| {
                let started = Instant::now();
                std::thread::scope(|s| {
                    for part in 0..2 {
                        let x = &x;
                        s.spawn(move || {
                            let mut out = vec![0f32; half * n];
                            for m in matrices {
                                // SAFETY: AVX-512F was checked in main; shapes as documented.
                                unsafe { f(&m[part * half * k..][..half * k], k, x, &mut out) };
                            }
                            std::hint::black_box(&out);
                        });
                    }
                });
                bytes as f64 / started.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    }

    pub fn compare<E: Stored>(rows: usize, k: usize) {
        let copies = ((1usize << 30) / (rows * k * std::mem::size_of::<E>())).max(1);
        let matrices: Vec<Vec<E>> = (0..copies)
            .map(|c| {
                (0..rows * k)
                    .map(|i| E::from_f32(((i + c) % 97) as f32 * 0.01))
                    .collect()
            })
            .collect();
        let blocks: [Product<E>; 4] = [
            product::<E, 4, 1, 1, 1024>,
            product::<E, 4, 1, 2, 1024>,
            product::<E, 4, 1, 3, 1024>,
            product::<E, 4, 1, 4, 1024>,
        ];
        let streams: [Product<E>; 4] = [
            product::<E, 1, 4, 1, 2048>,
            product::<E, 1, 2, 2, 2048>,
            product::<E, 1, 2, 3, 2048>,
            product::<E, 1, 2, 4, 2048>,
        ];
        for n in 1..=4 {
            let block = gbps(blocks[n - 1], &matrices, rows, k, n);
            let stream = gbps(streams[n - 1], &matrices, rows, k, n);
            println!(
                "{:>5} {rows}x{k} n={n} | 4-row blocks {block:5.1} GB/s | row stream {stream:5.1} GB/s",
                E::NAME
            );
        }
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (rows, k) = match args[..] {
        [rows, k] if rows % 8 == 0 && k % 64 == 0 => (rows, k),
        [] => (1024, 1024),
        _ => {
            eprintln!("usage: row_streams [ROWS IN], ROWS a multiple of 8, IN of 64");
            std::process::exit(2);
        }
    };
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        layouts::compare::<half::f16>(rows, k);
        layouts::compare::<f32>(rows, k);
        return;
    }
    eprintln!("row_streams needs an x86-64 CPU with AVX-512F");
}
