//! The expert-parallel flags of `serve`, and how they become the library's [`ShardSettings`]
//! (including the rank taken from `$POD_NAME` in the operator's pods).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use latentserve_proto::v1::WireDtype;

use super::parse::parse_duration;
use crate::experts::auth::ExpertsAuth;
use crate::experts::shard::ShardSettings;

/// Element type of hidden rows sent between shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WireDtypeArg {
    F32,
    F16,
    Bf16,
}

impl WireDtypeArg {
    pub fn wire(self) -> WireDtype {
        match self {
            WireDtypeArg::F32 => WireDtype::F32,
            WireDtypeArg::F16 => WireDtype::F16,
            WireDtypeArg::Bf16 => WireDtype::Bf16,
        }
    }
}

/// The expert-parallel flags of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ShardArgs {
    /// This worker's rank among the shards of its group (0-based).
    #[arg(long, default_value_t = 0, conflicts_with = "shard_rank_from_pod_name")]
    pub shard_rank: u32,
    /// Take the rank from the ordinal at the end of $POD_NAME (a StatefulSet pod `demo-0-3` is
    /// rank 3), as the operator's pods do: the pod spec is the same for every rank.
    #[arg(long)]
    pub shard_rank_from_pod_name: bool,
    /// Address of the expert exchange of a group of more than one shard: a port of its own,
    /// never the client port, so that a NetworkPolicy can admit it from the group's pods only.
    #[arg(long, default_value = "0.0.0.0:50052")]
    pub experts_addr: std::net::SocketAddr,
    /// Shards (pods) per group; the routed experts are split across them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub shard_count: u32,
    /// Expert exchange addresses (`--experts-addr`) of the shards, HOST:PORT,...: all of them in
    /// rank order (this worker's own entry is skipped) or the others in rank order. DNS names are
    /// re-resolved on reconnect.
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// JSON file mapping each routed expert to the shards holding it, for every MoE layer
    /// (`{"experts": [[0], [0, 1], ...]}`) or per layer (`{"layers": {"3": [...], ...}}`), replicas
    /// allowed; whole expert groups (or contiguous ranges) per shard by default.
    #[arg(long)]
    pub expert_placement: Option<PathBuf>,
    /// Extra expert slots per shard in the default placement, each holding a copy of one of the
    /// next shard's experts, so that requests keep working while a shard is down. At least
    /// experts / shards puts every expert on two shards. Not with --expert-placement (the file
    /// lists replicas itself) nor with --shard-count 1.
    #[arg(long, default_value_t = 0)]
    pub redundant_experts: u32,
    /// Element type of hidden rows and partial sums sent between shards.
    #[arg(long, value_enum, default_value_t = WireDtypeArg::F32)]
    pub expert_wire_dtype: WireDtypeArg,
    /// Longest a call to a peer's experts may take before its requests fail with UNAVAILABLE
    /// (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub expert_rpc_timeout: Duration,
    /// The group's shared token (the operator's `NAME-experts-token` Secret, key `token`): sent
    /// on every call to a peer, and required of every caller of the expert exchange. A file named
    /// `previous` next to it holds the token still accepted during a rotation. Without it the
    /// exchange is open to anyone who reaches the port: for one host or development only.
    #[arg(long)]
    pub experts_token_file: Option<PathBuf>,
}

impl Default for ShardArgs {
    fn default() -> Self {
        Self {
            shard_rank: 0,
            shard_rank_from_pod_name: false,
            experts_addr: std::net::SocketAddr::from(([0, 0, 0, 0], 50052)),
            shard_count: 1,
            peers: Vec::new(),
            expert_placement: None,
            redundant_experts: 0,
            expert_wire_dtype: WireDtypeArg::F32,
            expert_rpc_timeout: Duration::from_secs(10),
            experts_token_file: None,
        }
    }
}

impl ShardArgs {
    /// Resolves `--shard-rank-from-pod-name` into `shard_rank` from the `POD_NAME` environment
    /// variable (set by the downward API).
    pub fn resolve_rank(&mut self) -> anyhow::Result<()> {
        if self.shard_rank_from_pod_name {
            let pod_name = std::env::var("POD_NAME").context(
                "--shard-rank-from-pod-name needs the POD_NAME environment variable (downward API)",
            )?;
            self.shard_rank = rank_from_pod_name(&pod_name)?;
        }
        Ok(())
    }

    /// The library's view of these flags, reading the token file if there is one.
    pub fn settings(&self) -> anyhow::Result<ShardSettings> {
        let auth = match &self.experts_token_file {
            Some(path) => ExpertsAuth::from_file(path)
                .with_context(|| format!("--experts-token-file {}", path.display()))?,
            None => ExpertsAuth::open(),
        };
        Ok(ShardSettings {
            rank: self.shard_rank as usize,
            count: self.shard_count as usize,
            peers: self.peers.clone(),
            expert_placement: self.expert_placement.clone(),
            redundant_experts: self.redundant_experts as usize,
            wire_dtype: self.expert_wire_dtype.wire(),
            rpc_timeout: self.expert_rpc_timeout,
            auth,
        })
    }
}

/// The ordinal at the end of a StatefulSet pod name (`demo-0-3` -> 3).
pub fn rank_from_pod_name(pod_name: &str) -> anyhow::Result<u32> {
    pod_name
        .rsplit_once('-')
        .and_then(|(_, ordinal)| ordinal.parse().ok())
        .with_context(|| {
            format!("--shard-rank-from-pod-name: POD_NAME {pod_name:?} does not end in -<ordinal>")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rank_is_the_pod_ordinal() {
        assert_eq!(rank_from_pod_name("demo-0-3").unwrap(), 3);
        assert_eq!(rank_from_pod_name("my-model-12-0").unwrap(), 0);
        let error = rank_from_pod_name("demo").unwrap_err().to_string();
        assert!(error.contains("\"demo\""), "{error}");
        assert!(rank_from_pod_name("demo-0-x").is_err());
    }

    #[test]
    fn the_flags_become_the_settings_they_name() {
        let args = ShardArgs {
            shard_rank: 2,
            shard_count: 4,
            peers: vec!["a:1".into(), "b:2".into(), "c:3".into()],
            expert_wire_dtype: WireDtypeArg::Bf16,
            expert_rpc_timeout: Duration::from_millis(500),
            ..ShardArgs::default()
        };
        let settings = args.settings().unwrap();
        assert!(settings.auth.is_open());
        assert_eq!((settings.rank, settings.count), (2, 4));
        assert_eq!(settings.peers.len(), 3);
        assert_eq!(settings.wire_dtype, WireDtype::Bf16);
        assert_eq!(settings.rpc_timeout, Duration::from_millis(500));
    }
}
