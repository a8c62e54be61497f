//! Mixture of experts: route -> dispatch plan grouped by expert -> run experts -> combine.
//!
//! Routing is a pure function of router logits (tested on hand-computed cases). Running the
//! experts sits behind [`ExpertExecutor`], so expert sharding can send part of a plan to the
//! workers that hold those experts and add the weighted sums that come back.

use candle_core::{Device, Tensor};
use latentserve_kernels::Linear;

use super::ModelError;
use super::config::{MoeConfig, ScoringFunc, TopkMethod};
use super::ops::{project, silu_mul};

/// The experts chosen for each token and their combine weights: (tokens, k) each.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Indices of the `k` largest values (ties keep the lower index), largest first.
fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Routes `rows` tokens given their router logits (rows, n_routed_experts) and, for V3, the
/// `e_score_correction_bias` (used to choose experts, never to weight them).
pub fn route(logits: &[f32], correction_bias: Option<&[f32]>, moe: &MoeConfig) -> Routing {
    let n = moe.n_routed_experts;
    let k = moe.num_experts_per_tok;
    let rows = logits.len() / n;
    let mut experts = Vec::with_capacity(rows * k);
    let mut weights = Vec::with_capacity(rows * k);
    let group_size = n / moe.n_group;
    for row in logits.chunks_exact(n) {
        // (n_routed_experts) scores
        let scores: Vec<f32> = match moe.scoring_func {
            ScoringFunc::Softmax => {
                let mut s = row.to_vec();
                super::ops::softmax(&mut s);
                s
            }
            ScoringFunc::Sigmoid => row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        };
        let mut choice: Vec<f32> = match (moe.topk_method, correction_bias) {
            (TopkMethod::NoauxTc, Some(bias)) => {
                scores.iter().zip(bias).map(|(s, b)| s + b).collect()
            }
            _ => scores.clone(),
        };
        if moe.topk_method != TopkMethod::Greedy {
            // (n_group) group scores: the max (V2) or the sum of the top 2 (V3) of each group.
            let group_scores: Vec<f32> = choice
                .chunks_exact(group_size)
                .map(|g| match moe.topk_method {
                    TopkMethod::NoauxTc => top_k_indices(g, 2).iter().map(|&i| g[i]).sum(),
                    _ => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                })
                .collect();
            let kept = top_k_indices(&group_scores, moe.topk_group);
            // Experts outside the kept groups can never be chosen. (DeepSeek's hub code fills them
            // with 0.0, which differs only when a bias-corrected score is negative; -inf is what
            // DeepSeek-V3's inference code, vLLM and transformers do.)
            for (g, group) in choice.chunks_exact_mut(group_size).enumerate() {
                if !kept.contains(&g) {
                    group.fill(f32::NEG_INFINITY);
                }
            }
        }
        let chosen = top_k_indices(&choice, k);
        // Weights come from the uncorrected scores.
        let mut w: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
        let normalize = moe.norm_topk_prob && k > 1;
        if normalize {
            let denominator = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|v| *v /= denominator);
        }
        // DeepSeek's V2 gate scales only weights it did not normalize; V3 always scales.
        let scale = match moe.scoring_func {
            ScoringFunc::Softmax if normalize => 1.0,
            _ => moe.routed_scaling_factor as f32,
        };
        experts.extend(chosen.iter().map(|&e| e as u32));
        weights.extend(w.iter().map(|v| v * scale));
    }
    Routing {
        k,
        experts,
        weights,
    }
}

/// The tokens one expert must process and the weight of each in the combine.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertWork {
    pub expert: usize,
    /// Token rows of the hidden-state batch, ascending.
    pub rows: Vec<u32>,
    pub weights: Vec<f32>,
}

/// A routing regrouped by expert (ascending), so that each expert runs once over all its tokens.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DispatchPlan {
    pub works: Vec<ExpertWork>,
}

impl DispatchPlan {
    pub fn from_routing(routing: &Routing, n_experts: usize) -> Self {
        let mut per_expert: Vec<ExpertWork> = (0..n_experts)
            .map(|expert| ExpertWork {
                expert,
                rows: Vec::new(),
                weights: Vec::new(),
            })
            .collect();
        for (i, (&e, &w)) in routing.experts.iter().zip(&routing.weights).enumerate() {
            let work = &mut per_expert[e as usize];
            work.rows.push((i / routing.k) as u32);
            work.weights.push(w);
        }
        Self {
            works: per_expert
                .into_iter()
                .filter(|w| !w.rows.is_empty())
                .collect(),
        }
    }

    /// The part of the plan whose experts satisfy `keep` (e.g. the experts one shard holds).
    pub fn select(&self, keep: impl Fn(usize) -> bool) -> Self {
        Self {
            works: self
                .works
                .iter()
                .filter(|w| keep(w.expert))
                .cloned()
                .collect(),
        }
    }
}

/// Runs (token rows, expert ids, weights) on a set of experts and returns the weighted sums.
pub trait ExpertExecutor: Send + Sync {
    /// `hidden`: (rows, hidden_size), the post-attention-normalized hidden states the plan's rows
    /// index. Returns (rows, hidden_size): for each row, the sum over its plan entries of
    /// weight * expert(hidden[row]); rows no expert touched are zero.
    fn run_experts(
        &self,
        layer: usize,
        hidden: &[f32],
        hidden_size: usize,
        plan: &DispatchPlan,
    ) -> Result<Vec<f32>, ModelError>;
}

/// A SwiGLU MLP `down(silu(gate(x)) * up(x))` with gate and up fused into one projection.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// (2 * width, hidden): gate rows then up rows.
    gate_up: Linear,
    /// (hidden, width)
    down: Linear,
    width: usize,
}

impl Mlp {
    pub fn new(gate_up: Linear, down: Linear) -> Self {
        let width = down.in_features();
        Self {
            gate_up,
            down,
            width,
        }
    }

    /// (rows, hidden) -> (rows, hidden)
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
        // (rows, 2 * width)
        let gate_up = project(&self.gate_up, x, rows)?;
        // (rows, width)
        let act = silu_mul(&gate_up, self.width);
        project(&self.down, &act, rows)
    }

    pub fn weight_bytes(&self) -> usize {
        self.gate_up.weight_bytes() + self.down.weight_bytes()
    }
}

/// The routed experts this worker holds, per layer (`None` where another shard holds it).
#[derive(Debug, Default)]
pub struct LocalExperts {
    pub(crate) layers: Vec<Vec<Option<Mlp>>>,
}

impl LocalExperts {
    /// Weight bytes of one expert of `layer`, if loaded here.
    pub fn expert(&self, layer: usize, expert: usize) -> Option<&Mlp> {
        self.layers.get(layer)?.get(expert)?.as_ref()
    }

    /// Whether this worker holds `expert` of `layer`.
    pub fn holds(&self, layer: usize, expert: usize) -> bool {
        self.expert(layer, expert).is_some()
    }
}

impl Mlp {
    /// Several MLPs, each on its own rows, with each of the two projection stages of all of them
    /// run as one parallel pass (small expert products share the cores instead of each paying
    /// for a fork and join). Inputs (rows_i, hidden) -> outputs (rows_i, hidden).
    pub fn forward_many(items: &[(&Mlp, Vec<f32>, usize)]) -> Result<Vec<Vec<f32>>, ModelError> {
        let device = Device::Cpu;
        let inputs = items
            .iter()
            .map(|(mlp, x, rows)| {
                Tensor::from_slice(x, (*rows, mlp.gate_up.in_features()), &device)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pairs: Vec<(&Linear, &Tensor)> = items
            .iter()
            .zip(&inputs)
            .map(|((mlp, _, _), x)| (&mlp.gate_up, x))
            .collect();
        // (rows_i, 2 * width) each
        let gate_up = Linear::forward_many(&pairs)?;
        let activations = items
            .iter()
            .zip(&gate_up)
            .map(|((mlp, _, rows), gu)| {
                let act = silu_mul(&gu.flatten_all()?.to_vec1::<f32>()?, mlp.width);
                Tensor::from_vec(act, (*rows, mlp.width), &device)
            })
            .collect::<Result<Vec<_>, candle_core::Error>>()?;
        let pairs: Vec<(&Linear, &Tensor)> = items
            .iter()
            .zip(&activations)
            .map(|((mlp, _, _), x)| (&mlp.down, x))
            .collect();
        Linear::forward_many(&pairs)?
            .iter()
            .map(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            .collect()
    }
}

impl ExpertExecutor for LocalExperts {
    fn run_experts(
        &self,
        layer: usize,
        hidden: &[f32],
        hidden_size: usize,
        plan: &DispatchPlan,
    ) -> Result<Vec<f32>, ModelError> {
        // gather: (m_e, hidden) per expert
        let items = plan
            .works
            .iter()
            .map(|work| {
                let mlp = self
                    .expert(layer, work.expert)
                    .ok_or(ModelError::ExpertNotLoaded {
                        layer,
                        expert: work.expert,
                    })?;
                let mut x = Vec::with_capacity(work.rows.len() * hidden_size);
                for &r in &work.rows {
                    let r = r as usize;
                    x.extend_from_slice(&hidden[r * hidden_size..(r + 1) * hidden_size]);
                }
                Ok((mlp, x, work.rows.len()))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let outputs = Mlp::forward_many(&items)?;
        // weighted scatter-add, in expert order
        let mut out = vec![0f32; hidden.len()];
        for (work, y) in plan.works.iter().zip(&outputs) {
            for ((&r, &w), y_row) in work
                .rows
                .iter()
                .zip(&work.weights)
                .zip(y.chunks_exact(hidden_size))
            {
                let r = r as usize;
                super::ops::axpy(&mut out[r * hidden_size..(r + 1) * hidden_size], w, y_row);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moe(scoring: ScoringFunc, method: TopkMethod, groups: usize, keep: usize) -> MoeConfig {
        MoeConfig {
            n_routed_experts: 8,
            num_experts_per_tok: 2,
            n_shared_experts: 1,
            moe_intermediate_size: 4,
            scoring_func: scoring,
            topk_method: method,
            n_group: groups,
            topk_group: keep,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
        }
    }

    #[test]
    fn v2_greedy_softmax_picks_largest_and_scales() {
        let mut cfg = moe(ScoringFunc::Softmax, TopkMethod::Greedy, 1, 1);
        cfg.routed_scaling_factor = 2.0;
        let logits = [0.0, 1.0, 3.0, 0.0, 2.0, 0.0, 0.0, 0.0];
        let r = route(&logits, None, &cfg);
        assert_eq!(r.experts, vec![2, 4]);
        let z: f32 = logits.iter().map(|x: &f32| x.exp()).sum();
        assert!((r.weights[0] - 2.0 * 3f32.exp() / z).abs() < 1e-6);
        assert!((r.weights[1] - 2.0 * 2f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn v2_group_limited_greedy_uses_group_max() {
        // 4 groups of 2; group maxima: g0 = 5, g1 = 1, g2 = 4.9, g3 = 4.8 -> keep g0 and g2.
        // Best experts overall would be 0 (5) and 6 (4.8 in g3) but g3 is dropped.
        let cfg = moe(ScoringFunc::Softmax, TopkMethod::GroupLimitedGreedy, 4, 2);
        let logits = [5.0, 0.0, 1.0, 1.0, 4.9, -1.0, 4.8, 4.7];
        let r = route(&logits, None, &cfg);
        assert_eq!(r.experts, vec![0, 4]);
    }

    #[test]
    fn v3_noaux_tc_selects_with_bias_weights_without_and_normalizes() {
        let mut cfg = moe(ScoringFunc::Sigmoid, TopkMethod::NoauxTc, 4, 2);
        cfg.norm_topk_prob = true;
        cfg.routed_scaling_factor = 2.5;
        let logits = [0.0f32; 8];
        // All sigmoid scores are 0.5; the bias alone decides. Group sums of top 2 (bias only):
        // g0 = 0.1 + 0.0, g1 = 0.3 + 0.2, g2 = 0.0, g3 = 0.25 + 0.0 -> keep g1, g3.
        let bias = [0.1, 0.0, 0.3, 0.2, 0.0, 0.0, 0.25, 0.0];
        let r = route(&logits, Some(&bias), &cfg);
        assert_eq!(r.experts, vec![2, 6]);
        // Weights from the unbiased scores: 0.5 / (0.5 + 0.5) * 2.5.
        assert!(r.weights.iter().all(|w| (w - 1.25).abs() < 1e-6));

        // Group score is the sum of the top two, not the max: g0 has one high expert (0.9),
        // g1 has two fairly high (0.6 + 0.6 = 1.2 > 0.9 + 0.0).
        let cfg = moe(ScoringFunc::Sigmoid, TopkMethod::NoauxTc, 4, 1);
        let bias = [0.9, 0.0, 0.6, 0.6, 0.0, 0.0, 0.0, 0.0];
        let r = route(&logits, Some(&bias), &cfg);
        assert_eq!(r.experts, vec![2, 3]);
        assert!(r.weights.iter().all(|w| (w - 0.5).abs() < 1e-6));
    }

    #[test]
    fn dispatch_plan_groups_rows_by_expert() {
        let routing = Routing {
            k: 2,
            experts: vec![3, 1, 1, 0, 3, 2],
            weights: vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        };
        let plan = DispatchPlan::from_routing(&routing, 4);
        let summary: Vec<(usize, Vec<u32>)> = plan
            .works
            .iter()
            .map(|w| (w.expert, w.rows.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![(0, vec![1]), (1, vec![0, 1]), (2, vec![2]), (3, vec![0, 2])]
        );
        assert_eq!(plan.works[3].weights, vec![0.1, 0.5]);
        let odd = plan.select(|e| e % 2 == 1);
        assert_eq!(odd.works.len(), 2);
    }
}
