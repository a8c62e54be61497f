//! Batch-size buckets for CUDA-graph capture of decode steps.
//!
//! A captured graph replays fixed shapes, so decode steps are captured once per bucket
//! (1, 2, 4, 8, 16, ... up to and including `max_batch`) and a step of `n` sequences replays the
//! smallest bucket >= n, with the rows past `n` padded (their block-table rows point at a
//! scratch block and their outputs are ignored).

/// The capture buckets: powers of two below `max_batch`, then `max_batch` itself.
pub fn buckets(max_batch: usize) -> Vec<usize> {
    if max_batch == 0 {
        return Vec::new();
    }
    let mut out: Vec<usize> = std::iter::successors(Some(1usize), |b| b.checked_mul(2))
        .take_while(|&b| b < max_batch)
        .collect();
    out.push(max_batch);
    out
}

/// The bucket a batch of `n` runs in, or `None` when `n` is 0 or exceeds the largest bucket.
pub fn bucket_for(buckets: &[usize], n: usize) -> Option<usize> {
    if n == 0 {
        return None;
    }
    buckets.iter().copied().find(|&b| b >= n)
}

/// Rows of padding a batch of `n` carries in its bucket.
pub fn padding(buckets: &[usize], n: usize) -> Option<usize> {
    bucket_for(buckets, n).map(|b| b - n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_then_the_maximum() {
        assert_eq!(buckets(1), [1]);
        assert_eq!(buckets(2), [1, 2]);
        assert_eq!(buckets(64), [1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(buckets(48), [1, 2, 4, 8, 16, 32, 48]);
        assert_eq!(buckets(256).len(), 9);
        assert!(buckets(0).is_empty());
    }

    #[test]
    fn a_batch_runs_in_the_smallest_bucket_that_holds_it() {
        let b = buckets(48);
        assert_eq!(bucket_for(&b, 1), Some(1));
        assert_eq!(bucket_for(&b, 3), Some(4));
        assert_eq!(bucket_for(&b, 16), Some(16));
        assert_eq!(bucket_for(&b, 33), Some(48));
        assert_eq!(bucket_for(&b, 48), Some(48));
        assert_eq!(bucket_for(&b, 49), None);
        assert_eq!(bucket_for(&b, 0), None);
        assert_eq!(padding(&b, 5), Some(3));
        assert_eq!(padding(&b, 8), Some(0));
        // Padding never reaches half of the bucket except at the max.
        for n in 1..=32 {
            let bucket = bucket_for(&b, n).unwrap();
            assert!(bucket < 2 * n, "n={n} bucket={bucket}");
        }
    }
}
