//! The worker's command line as the operator writes it: one constant per flag of
//! `latentserve-worker serve`, the list of flags the operator owns (which `serving.extraArgs`
//! must not repeat, in the validator and in the CRD's CEL rule alike), and [`ServeArgs`], the
//! typed arguments that render to the container's `args`. Nothing else in the operator spells a
//! worker flag; `tests/tests/worker_flags.rs` parses what this renders with the worker's own parser.

use crate::crd::Dtype;

/// The subcommand every worker container runs.
pub const SERVE: &str = "serve";

pub const MODEL: &str = "--model";
/// The name clients send as OpenAI's `model` and every metric's `model` label.
pub const MODEL_NAME: &str = "--model-name";
pub const GRPC_ADDR: &str = "--grpc-addr";
pub const OPENAI_ADDR: &str = "--openai-addr";
pub const EXPERTS_ADDR: &str = "--experts-addr";
pub const METRICS_ADDR: &str = "--metrics-addr";
/// Never written by the operator (it conflicts with [`SHARD_RANK_FROM_POD_NAME`]), but reserved:
/// a rank in `extraArgs` would break the group's shard plan.
pub const SHARD_RANK: &str = "--shard-rank";
pub const SHARD_RANK_FROM_POD_NAME: &str = "--shard-rank-from-pod-name";
pub const SHARD_COUNT: &str = "--shard-count";
pub const PEERS: &str = "--peers";
pub const DRAIN_TIMEOUT: &str = "--drain-timeout";
pub const MAX_BATCH_SIZE: &str = "--max-batch-size";
pub const MAX_SEQ_LEN: &str = "--max-seq-len";
pub const KV_CACHE_MEMORY: &str = "--kv-cache-memory";
pub const NO_PREFIX_CACHING: &str = "--no-prefix-caching";
pub const DTYPE: &str = "--dtype";
/// The placement file of a group on a balanced placement (`spec.expertPlacement`), from the
/// version's ConfigMap.
pub const EXPERT_PLACEMENT: &str = "--expert-placement";
/// Extra expert slots per shard in the default layout (`expertPlacement.redundantExperts`).
pub const REDUNDANT_EXPERTS: &str = "--redundant-experts";

/// TLS on the client ports, from `spec.tls`'s Secret.
pub const TLS_CERT: &str = "--tls-cert";
pub const TLS_KEY: &str = "--tls-key";
pub const TLS_CLIENT_CA: &str = "--tls-client-ca";
/// The group's shared token of the expert exchange, from the operator's Secret.
pub const EXPERTS_TOKEN_FILE: &str = "--experts-token-file";

/// Flags `serving.extraArgs` must not name: the addresses and the shard plan the operator sets
/// on every worker, and the limits it derives from `spec.serving` (an extra `--max-seq-len`
/// would otherwise win over the spec, as the worker takes the last value). `--model-name` is
/// not among them: the operator sets it only when `extraArgs` does not.
pub const RESERVED: &[&str] = &[
    MODEL,
    GRPC_ADDR,
    OPENAI_ADDR,
    EXPERTS_ADDR,
    METRICS_ADDR,
    SHARD_RANK,
    SHARD_RANK_FROM_POD_NAME,
    SHARD_COUNT,
    PEERS,
    DRAIN_TIMEOUT,
    EXPERT_PLACEMENT,
    REDUNDANT_EXPERTS,
    MAX_BATCH_SIZE,
    MAX_SEQ_LEN,
    KV_CACHE_MEMORY,
    NO_PREFIX_CACHING,
    DTYPE,
    TLS_CERT,
    TLS_KEY,
    TLS_CLIENT_CA,
    EXPERTS_TOKEN_FILE,
];

/// The CEL rule on `serving.extraArgs` that keeps [`RESERVED`] flags out on clusters that
/// enforce CEL (1.25+); the validator applies the same rule everywhere.
pub fn extra_args_cel_rule() -> String {
    let quoted: Vec<String> = RESERVED.iter().map(|flag| format!("'{flag}'")).collect();
    format!("self.all(a, !(a.split('=')[0] in [{}]))", quoted.join(", "))
}

/// The flag of one `extraArgs` entry: `--flag` of `--flag=value`.
pub fn flag_of(arg: &str) -> &str {
    arg.split('=').next().unwrap_or_default()
}

/// Paths of the PEM files of `--tls-cert`, `--tls-key` and `--tls-client-ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: String,
    pub key: String,
    pub client_ca: Option<String>,
}

/// Everything a worker of one serving group is started with, typed; [`ServeArgs::render`] turns
/// it into the container's `args`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeArgs {
    pub model: String,
    /// `None` when `extra_args` names the model itself.
    pub model_name: Option<String>,
    pub grpc_addr: String,
    /// The OpenAI-compatible HTTP API.
    pub openai_addr: String,
    pub experts_addr: String,
    pub metrics_addr: String,
    /// The rank is the pod's StatefulSet ordinal: the worker reads it from `$POD_NAME`.
    pub shard_count: i32,
    /// `host:port` of every rank of the group's expert exchange, in rank order.
    pub peers: Vec<String>,
    pub drain_timeout_seconds: i64,
    pub max_batch_size: Option<i32>,
    pub max_seq_len: Option<i32>,
    pub kv_cache_bytes: Option<u64>,
    /// `Some(false)` turns prefix caching off; the worker's default is on.
    pub prefix_caching: Option<bool>,
    pub dtype: Option<Dtype>,
    /// TLS files on the client ports.
    pub tls: Option<TlsFiles>,
    /// The expert exchange's token file (groups of more than one shard).
    pub experts_token_file: Option<String>,
    /// Which experts each shard holds: a placement file, or the default layout with this many
    /// redundant slots per shard (0: none, the flag is left out).
    pub expert_placement: ExpertPlacementArg,
    /// Appended last, as written in the spec.
    pub extra_args: Vec<String>,
}

/// Where a worker's expert placement comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertPlacementArg {
    /// The worker's default layout, with `redundant` extra slots per shard.
    Default { redundant: usize },
    /// A placement file (a version's ConfigMap, mounted).
    File(String),
}

impl ServeArgs {
    /// The container's `args`: the subcommand, the operator's flags, then the extra ones.
    pub fn render(&self) -> Vec<String> {
        let mut args = vec![SERVE.to_owned()];
        let mut flag = |name: &str, value: Option<String>| {
            args.push(name.to_owned());
            args.extend(value);
        };
        flag(MODEL, Some(self.model.clone()));
        if let Some(name) = &self.model_name {
            flag(MODEL_NAME, Some(name.clone()));
        }
        flag(GRPC_ADDR, Some(self.grpc_addr.clone()));
        flag(OPENAI_ADDR, Some(self.openai_addr.clone()));
        flag(EXPERTS_ADDR, Some(self.experts_addr.clone()));
        flag(METRICS_ADDR, Some(self.metrics_addr.clone()));
        flag(SHARD_RANK_FROM_POD_NAME, None);
        flag(SHARD_COUNT, Some(self.shard_count.to_string()));
        // A single shard has no peers, and the worker refuses a peer list without shards.
        if self.shard_count > 1 {
            flag(PEERS, Some(self.peers.join(",")));
        }
        flag(
            DRAIN_TIMEOUT,
            Some(format!("{}s", self.drain_timeout_seconds)),
        );
        if let Some(n) = self.max_batch_size {
            flag(MAX_BATCH_SIZE, Some(n.to_string()));
        }
        if let Some(n) = self.max_seq_len {
            flag(MAX_SEQ_LEN, Some(n.to_string()));
        }
        if let Some(bytes) = self.kv_cache_bytes {
            flag(KV_CACHE_MEMORY, Some(bytes.to_string()));
        }
        if self.prefix_caching == Some(false) {
            flag(NO_PREFIX_CACHING, None);
        }
        if let Some(dtype) = self.dtype {
            flag(DTYPE, Some(dtype.as_str().to_owned()));
        }
        if let Some(tls) = &self.tls {
            flag(TLS_CERT, Some(tls.cert.clone()));
            flag(TLS_KEY, Some(tls.key.clone()));
            if let Some(ca) = &tls.client_ca {
                flag(TLS_CLIENT_CA, Some(ca.clone()));
            }
        }
        if let Some(path) = &self.experts_token_file {
            flag(EXPERTS_TOKEN_FILE, Some(path.clone()));
        }
        match &self.expert_placement {
            ExpertPlacementArg::File(path) => flag(EXPERT_PLACEMENT, Some(path.clone())),
            ExpertPlacementArg::Default { redundant: 0 } => {}
            ExpertPlacementArg::Default { redundant } => {
                flag(REDUNDANT_EXPERTS, Some(redundant.to_string()))
            }
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cel_rule_names_every_reserved_flag() {
        assert_eq!(
            extra_args_cel_rule(),
            "self.all(a, !(a.split('=')[0] in ['--model', '--grpc-addr', '--openai-addr', \
             '--experts-addr', '--metrics-addr', '--shard-rank', '--shard-rank-from-pod-name', \
             '--shard-count', '--peers', '--drain-timeout', '--expert-placement', \
             '--redundant-experts', '--max-batch-size', '--max-seq-len', '--kv-cache-memory', '--no-prefix-caching', \
             '--dtype', '--tls-cert', '--tls-key', '--tls-client-ca', '--experts-token-file']))"
        );
    }

    /// Every flag [`ServeArgs::render`] writes from the spec is reserved, but `--model-name`.
    #[test]
    fn every_flag_the_operator_renders_is_reserved() {
        let args = ServeArgs {
            model: "/model".into(),
            model_name: Some("demo".into()),
            grpc_addr: "0.0.0.0:50051".into(),
            openai_addr: "0.0.0.0:8000".into(),
            experts_addr: "0.0.0.0:50052".into(),
            metrics_addr: "0.0.0.0:9090".into(),
            shard_count: 2,
            peers: vec!["a:1".into(), "b:1".into()],
            drain_timeout_seconds: 30,
            max_batch_size: Some(8),
            max_seq_len: Some(512),
            kv_cache_bytes: Some(1 << 20),
            prefix_caching: Some(false),
            dtype: Some(Dtype::F16),
            tls: Some(TlsFiles {
                cert: "/tls/tls.crt".into(),
                key: "/tls/tls.key".into(),
                client_ca: Some("/tls/ca.crt".into()),
            }),
            experts_token_file: Some("/token/token".into()),
            expert_placement: ExpertPlacementArg::Default { redundant: 2 },
            extra_args: vec![],
        };
        let with_file = ServeArgs {
            expert_placement: ExpertPlacementArg::File("/p/placement.json".into()),
            ..args.clone()
        };
        assert!(with_file.render().contains(&EXPERT_PLACEMENT.to_owned()));
        assert!(args.render().contains(&REDUNDANT_EXPERTS.to_owned()));
        let rendered = [with_file.render(), args.render()].concat();
        for arg in rendered.iter().filter(|a| a.starts_with("--")) {
            let flag = flag_of(arg);
            assert!(
                flag == MODEL_NAME || RESERVED.contains(&flag),
                "{flag} is written by the operator but extraArgs may repeat it"
            );
        }
        assert!(!RESERVED.contains(&MODEL_NAME));
    }

    #[test]
    fn the_flag_of_an_argument_is_before_its_equals_sign() {
        assert_eq!(flag_of("--peers=a:1,b:2"), "--peers");
        assert_eq!(flag_of("--no-prefix-caching"), "--no-prefix-caching");
    }
}
