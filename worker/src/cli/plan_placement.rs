//! `plan-placement --model DIR --shard-count N COUNTERS...`: a balanced expert placement file
//! from the expert counters of a running group, for groups run by hand (the operator does the
//! same under `expertPlacement.policy: Balanced`).
//!
//! Each COUNTERS file is one shard's `/metrics` exposition (e.g. `curl -s
//! http://HOST:9090/metrics > rank0.txt`), in rank order; several groups' files follow each other
//! (rank 0..N of group 0, then of group 1, ...). Counters are totals since each worker started:
//! give a second set with `--since` to measure over a window instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use clap::Args;
use latentserve_placement::eplb::{self, BalanceOptions};
use latentserve_placement::file::{ModelShape, PlacementFile};
use latentserve_placement::load::{ExpertLoad, measured_imbalance, predicted_imbalance};

use crate::model::config::ModelConfig;

#[derive(Debug, Args)]
pub struct PlanPlacementArgs {
    /// The model directory (its config.json gives the experts, groups and MoE layers).
    #[arg(long)]
    pub model: PathBuf,
    /// Shards per group.
    #[arg(long)]
    pub shard_count: usize,
    /// Extra expert slots per shard for copies of the hottest experts.
    #[arg(long, default_value_t = 0)]
    pub redundant_experts: usize,
    /// Least shards per expert: 2 keeps the group serving without any one shard (needs
    /// enough redundant slots).
    #[arg(long, default_value_t = 1)]
    pub min_replicas: usize,
    /// Nodes the shards are spread over, ranks contiguous per node (hierarchical placement:
    /// expert groups stay within a node).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// The `version` written into the file.
    #[arg(long)]
    pub version: Option<String>,
    /// Counters taken at the start of the window, in the same order as COUNTERS.
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub since: Vec<PathBuf>,
    /// Where to write the placement file (stdout when not given).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// One `/metrics` exposition per shard, in rank order.
    #[arg(required = true)]
    pub counters: Vec<PathBuf>,
}

pub fn run(args: &PlanPlacementArgs) -> anyhow::Result<()> {
    let config_path = args.model.join("config.json");
    let config = ModelConfig::from_file(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let moe = config
        .moe
        .with_context(|| format!("{}: the model has no routed experts", config_path.display()))?;
    let moe_layers: Vec<usize> = (0..config.num_hidden_layers)
        .filter(|&layer| config.is_moe_layer(layer))
        .collect();
    ensure!(args.shard_count >= 2, "--shard-count must be at least 2");
    ensure!(
        args.counters.len().is_multiple_of(args.shard_count),
        "{} counter files are not whole groups of --shard-count {}",
        args.counters.len(),
        args.shard_count
    );
    ensure!(
        args.since.is_empty() || args.since.len() == args.counters.len(),
        "--since names {} files but there are {} counter files",
        args.since.len(),
        args.counters.len()
    );
    let mut total = ExpertLoad::default();
    // Per group: layer -> rank loads.
    let mut groups: Vec<BTreeMap<usize, Vec<f64>>> = Vec::new();
    for (i, path) in args.counters.iter().enumerate() {
        let mut load = read_counters(path)?;
        if let Some(earlier) = args.since.get(i) {
            load = load.since(&read_counters(earlier)?);
        }
        let rank = i % args.shard_count;
        if rank == 0 {
            groups.push(BTreeMap::new());
        }
        let group = groups.last_mut().expect("pushed at rank 0");
        for (&layer, counts) in &load.layers {
            group
                .entry(layer)
                .or_insert_with(|| vec![0.0; args.shard_count])[rank] += counts.iter().sum::<f64>();
        }
        total.add(&load);
    }
    if total.total() == 0.0 {
        bail!("the counters hold no routed expert token: send traffic first");
    }
    let total = total.with_experts(moe.n_routed_experts);
    let options = BalanceOptions {
        shard_count: args.shard_count,
        redundant: args.redundant_experts,
        n_group: moe.n_group,
        nodes: args.nodes,
        min_replicas: args.min_replicas,
    };
    let placement = eplb::balanced(&total, &options).context("computing the placement")?;
    let file = PlacementFile::from_placement(&placement, args.version.clone());
    // What the workers will check: the file fits the model.
    file.resolve(ModelShape {
        n_experts: moe.n_routed_experts,
        moe_layers: &moe_layers,
        shard_count: args.shard_count,
    })
    .map_err(anyhow::Error::msg)
    .context("the placement does not fit the model")?;
    let measured: Vec<f64> = groups.iter().map(measured_imbalance).collect();
    eprintln!(
        "imbalance measured (per group): {}; predicted with this placement: {:.3}",
        measured
            .iter()
            .map(|m| format!("{m:.3}"))
            .collect::<Vec<_>>()
            .join(", "),
        predicted_imbalance(&placement, &total)
    );
    let json = file.to_json();
    match &args.output {
        Some(path) => std::fs::write(path, json + "\n")
            .with_context(|| format!("writing {}", path.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}

fn read_counters(path: &Path) -> anyhow::Result<ExpertLoad> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    ExpertLoad::from_prometheus_text(&text)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{}: not a worker's /metrics exposition", path.display()))
}
