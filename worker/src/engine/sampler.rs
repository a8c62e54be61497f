//! Logits -> next token: penalties, temperature, top-k, top-p, min-p and a per-request RNG.
//!
//! Every request owns its [`Sampler`] (with its own seeded RNG), and a token depends only on that
//! request's logits row and history, so a seeded or greedy request gives the same tokens whether
//! it runs alone or in a batch.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// How a request picks its tokens. Validated ranges are in [`SamplingParams::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    /// 1 disables; applied to every token of the prompt and the output (as in transformers).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated (as in OpenAI's API).
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every token already generated.
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks every range; the error names the parameter and its allowed range.
    pub fn validate(&self) -> Result<(), String> {
        let SamplingParams {
            temperature,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            ..
        } = *self;
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(format!("temperature must be >= 0, got {temperature}"));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {top_p}"));
        }
        if !(0.0..1.0).contains(&min_p) {
            return Err(format!("min_p must be in [0, 1), got {min_p}"));
        }
        if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
            return Err(format!(
                "repetition_penalty must be > 0, got {repetition_penalty}"
            ));
        }
        for (name, value) in [
            ("presence_penalty", presence_penalty),
            ("frequency_penalty", frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(format!("{name} must be in [-2, 2], got {value}"));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// The chosen token with its log-probability and, when asked, the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    /// Log-probability of `token` under the penalized distribution at temperature 1.
    pub logprob: f32,
    /// The `n` most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// One request's sampler: its parameters, RNG and output token counts for the penalties.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    output_counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            output_counts: HashMap::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits. `context` is the prompt and the output so far
    /// (for the repetition penalty); the sampler counts its own outputs for the other penalties.
    /// `num_top` alternatives are returned with log-probabilities.
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32], num_top: usize) -> SampledToken {
        self.apply_penalties(logits, context);
        let log_norm = log_sum_exp(logits);
        let top = if num_top > 0 {
            top_n(logits, num_top)
                .into_iter()
                .map(|(token, logit)| (token, logit - log_norm))
                .collect()
        } else {
            Vec::new()
        };
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        *self.output_counts.entry(token).or_default() += 1;
        SampledToken {
            token,
            logprob: logits[token as usize] - log_norm,
            top,
        }
    }

    fn apply_penalties(&self, logits: &mut [f32], context: &[u32]) {
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &token in context {
                let Some(logit) = logits.get_mut(token as usize) else {
                    continue;
                };
                if std::mem::replace(&mut seen[token as usize], true) {
                    continue;
                }
                *logit = if *logit > 0.0 {
                    *logit / penalty
                } else {
                    *logit * penalty
                };
            }
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for (&token, &count) in &self.output_counts {
                if let Some(logit) = logits.get_mut(token as usize) {
                    *logit -= presence + frequency * count as f32;
                }
            }
        }
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let temperature = self.params.temperature;
        // Candidates in a fixed order (most likely first, ties by id) so a seed always maps to
        // the same token.
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, logit)| logit.is_finite())
            .map(|(token, &logit)| (token as u32, logit))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k as usize);
        }
        // Scaled after subtracting the maximum: logit / temperature overflows to inf for tiny
        // temperatures (1e-39), and inf - inf is NaN; (logit - max) / temperature only goes to
        // -inf, whose exp is 0, so the distribution degrades to greedy.
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates
            .iter()
            .map(|(_, l)| ((l - max) / temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);

        let mut keep = probs.len();
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (index, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= self.params.top_p {
                    keep = index + 1;
                    break;
                }
            }
        }
        if self.params.min_p > 0.0 {
            let threshold = self.params.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&p| p >= threshold).count().max(1));
        }
        let kept = &probs[..keep];
        let mass: f32 = kept.iter().sum();
        let mut draw = self.rng.random::<f32>() * mass;
        for (index, p) in kept.iter().enumerate() {
            draw -= p;
            if draw <= 0.0 {
                return candidates[index].0;
            }
        }
        candidates[keep - 1].0
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (index, &logit) in logits.iter().enumerate() {
        if logit > logits[best] {
            best = index;
        }
    }
    best as u32
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln()
}

fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut indexed: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(token, &logit)| (token as u32, logit))
        .collect();
    let n = n.min(indexed.len());
    let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if n < indexed.len() {
        indexed.select_nth_unstable_by(n, by_logit);
        indexed.truncate(n);
    }
    indexed.sort_unstable_by(by_logit);
    indexed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit_and_reports_logprobs() {
        let mut sampler = Sampler::new(params(0.0));
        let mut logits = vec![0.0, 2.0, 1.0];
        let sampled = sampler.sample(&mut logits, &[], 2);
        assert_eq!(sampled.token, 1);
        let norm = (1.0f32 + 2.0f32.exp() + 1.0f32.exp()).ln();
        assert!((sampled.logprob - (2.0 - norm)).abs() < 1e-5);
        assert_eq!(
            sampled.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut sampler = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..params(1.0)
            });
            (0..20)
                .map(|_| sampler.sample(&mut logits.clone(), &[], 0).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn a_tiny_temperature_samples_the_most_likely_token() {
        // 1e-39 made every logit / temperature infinite, and inf - inf NaN: the draw then fell
        // through to an arbitrary candidate.
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.61).cos() * 10.0).collect();
        let best = argmax(&logits);
        for temperature in [1e-39, f32::MIN_POSITIVE, 1e-30] {
            let mut sampler = Sampler::new(params(temperature));
            for _ in 0..20 {
                let sampled = sampler.sample(&mut logits.clone(), &[], 0);
                assert_eq!(sampled.token, best, "temperature {temperature}");
            }
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut sampler = Sampler::new(SamplingParams {
            top_k: 1,
            ..params(5.0)
        });
        for _ in 0..20 {
            assert_eq!(sampler.sample(&mut [0.1, 0.3, 0.2], &[], 0).token, 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // Probabilities about 0.64, 0.24, 0.09, 0.03.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let mut top_p = Sampler::new(SamplingParams {
            top_p: 0.6,
            ..params(1.0)
        });
        let mut min_p = Sampler::new(SamplingParams {
            min_p: 0.3,
            ..params(1.0)
        });
        for _ in 0..50 {
            assert_eq!(top_p.sample(&mut logits.to_vec(), &[], 0).token, 0);
            assert!(min_p.sample(&mut logits.to_vec(), &[], 0).token <= 1);
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let sampler = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        });
        let mut logits = vec![4.0, -1.0, 3.0];
        sampler.apply_penalties(&mut logits, &[0, 1, 0]);
        assert_eq!(logits, vec![2.0, -2.0, 3.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens() {
        let mut sampler = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 1.0,
            ..params(0.0)
        });
        assert_eq!(sampler.sample(&mut [5.0, 4.0], &[], 0).token, 0);
        assert_eq!(sampler.sample(&mut [5.0, 4.0], &[], 0).token, 1);
        let mut logits = vec![5.0, 4.0];
        sampler.apply_penalties(&mut logits, &[]);
        assert_eq!(logits, vec![3.5, 2.5]);
    }

    #[test]
    fn validation_names_the_parameter() {
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                min_p: 1.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                frequency_penalty: 3.0,
                ..SamplingParams::default()
            },
        ];
        let names = [
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
        ];
        for (params, name) in bad.iter().zip(names) {
            let err = params.validate().unwrap_err();
            assert!(err.starts_with(name), "{err}");
        }
        assert!(SamplingParams::default().validate().is_ok());
    }
}
