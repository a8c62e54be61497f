//! The operator's worker command line, read by the worker's own parser: every StatefulSet the
//! operator builds starts a worker whose `serve` subcommand accepts its arguments as meant, and
//! every flag the operator reserves in `serving.extraArgs` is a real `serve` flag.

use clap::{CommandFactory, Parser};
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use latentserve_operator::crd::{
    Dtype, HostPathSource, ModelDeployment, ModelDeploymentSpec, ModelSource, ServingSpec,
};
use latentserve_operator::discovery::{Features, KubeVersion};
use latentserve_operator::resources::BuildContext;
use latentserve_operator::resources::statefulset::stateful_set;
use latentserve_operator::validate::validate;
use latentserve_operator::worker_args;
use latentserve_worker::cli::Cli;

fn features() -> Features {
    let groups = ["policy/v1", "networking.k8s.io/v1", "events.k8s.io/v1"].map(String::from);
    Features::from_discovery(KubeVersion::new(1, 33), &groups)
}

fn deployment(expert_shards: i32, serving: Option<ServingSpec>) -> ModelDeployment {
    let mut md = ModelDeployment::new(
        "demo",
        ModelDeploymentSpec {
            model: ModelSource::HostPath(HostPathSource {
                path: "/srv/models/demo".into(),
            }),
            replicas: 2,
            expert_shards,
            image: None,
            image_pull_policy: None,
            resources: None,
            serving,
            node_selector: Default::default(),
            tolerations: vec![],
            affinity: None,
            priority_class_name: None,
            service_account_name: None,
            service: None,
            router: None,
            paused: false,
            tls: None,
            autoscaling: None,
            expert_placement: None,
        },
    );
    md.metadata.namespace = Some("models".into());
    md.metadata.uid = Some("5d0c7e59-1f0e-4a4b-9a53-3f3c6f0b2a10".into());
    md
}

/// The worker container of group `group`, as the operator builds it.
fn worker_container(md: &ModelDeployment, group: i32) -> Container {
    let ctx = BuildContext {
        worker_image: "latentserve-worker:test".into(),
        router_image: "latentserve-router:test".into(),
        features: features(),
        policy: Default::default(),
    };
    let spec = validate(md, &ctx.features).expect("a valid spec");
    let sts = stateful_set(&spec, group, &ctx);
    sts.spec.unwrap().template.spec.unwrap().containers[0].clone()
}

/// The kubelet's expansion of `$(VAR)` in arguments, for the variables the container defines
/// from the pod's fields (given example values here); `$$` escapes, unknown names stay.
fn expand(arg: &str, container: &Container) -> String {
    let value_of = |name: &str| -> Option<String> {
        let var = container.env.iter().flatten().find(|v| v.name == name)?;
        if let Some(value) = &var.value {
            return Some(value.clone());
        }
        let field = &var.value_from.as_ref()?.field_ref.as_ref()?.field_path;
        Some(
            match field.as_str() {
                "metadata.name" => "demo-0-1",
                "metadata.namespace" => "models",
                other => panic!("no example value for the field {other}"),
            }
            .to_owned(),
        )
    };
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest
            .strip_prefix("$(")
            .and_then(|r| r.split_once(')'))
            .filter(|(name, _)| value_of(name).is_some())
        {
            out.push_str(&value_of(name).unwrap());
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The container's command line as the worker receives it.
fn command_line(container: &Container) -> Vec<String> {
    let command = container.command.clone().unwrap_or_default();
    assert_eq!(command, ["latentserve-worker"], "the image's binary");
    command
        .into_iter()
        .chain(
            container
                .args
                .iter()
                .flatten()
                .map(|a| expand(a, container)),
        )
        .collect()
}

/// The raw values the worker's `serve` parser got for the flag `--long`.
fn values(argv: &[String], long: &str) -> Option<Vec<String>> {
    let mut cli = Cli::command();
    let matches = cli
        .try_get_matches_from_mut(argv)
        .unwrap_or_else(|err| panic!("the worker refuses {argv:?}:\n{err}"));
    let (name, serve) = matches.subcommand().expect("a subcommand");
    assert_eq!(name, worker_args::SERVE);
    let serve_command = cli.find_subcommand(name).unwrap();
    let flag = long.trim_start_matches("--");
    let arg = serve_command
        .get_arguments()
        .find(|a| a.get_long() == Some(flag))
        .unwrap_or_else(|| panic!("serve has no {long}"));
    if serve.value_source(arg.get_id().as_str()) != Some(clap::parser::ValueSource::CommandLine) {
        return None;
    }
    Some(
        serve
            .get_raw(arg.get_id().as_str())
            .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default(),
    )
}

#[test]
fn the_worker_parses_the_arguments_of_every_group() {
    let serving = ServingSpec {
        max_batch_size: Some(32),
        max_seq_len: Some(4096),
        kv_cache_memory: Some(Quantity("2Gi".into())),
        prefix_caching: Some(false),
        dtype: Some(Dtype::F16),
        extra_args: vec!["--max-queue=128".into()],
    };
    let md = deployment(3, Some(serving));
    for group in 0..2 {
        let container = worker_container(&md, group);
        let argv = command_line(&container);
        Cli::try_parse_from(&argv)
            .unwrap_or_else(|err| panic!("the worker refuses {argv:?}:\n{err}"));
        let one = |long: &str| values(&argv, long).map(|v| v.join(","));
        assert_eq!(one(worker_args::MODEL).as_deref(), Some("/model"));
        assert_eq!(
            one(worker_args::OPENAI_ADDR).as_deref(),
            Some("0.0.0.0:8000")
        );
        assert_eq!(one(worker_args::SHARD_COUNT).as_deref(), Some("3"));
        assert_eq!(
            values(&argv, worker_args::PEERS).unwrap(),
            (0..3)
                .map(|rank| format!("demo-{group}-{rank}.demo-peers.models.svc:50052"))
                .collect::<Vec<_>>()
        );
        // What the worker checks at start, after parsing.
        let peers = values(&argv, worker_args::PEERS).unwrap();
        assert_eq!(
            latentserve_worker::experts::peers::peer_ranks(&peers, 1, 3).map(|p| p.len()),
            Ok(2)
        );
        assert!(values(&argv, worker_args::SHARD_RANK_FROM_POD_NAME).is_some());
        assert_eq!(
            one(worker_args::KV_CACHE_MEMORY).as_deref(),
            Some("2147483648")
        );
        assert_eq!(one(worker_args::MAX_BATCH_SIZE).as_deref(), Some("32"));
        assert_eq!(one(worker_args::MAX_SEQ_LEN).as_deref(), Some("4096"));
        assert!(values(&argv, worker_args::NO_PREFIX_CACHING).is_some());
        assert_eq!(one(worker_args::DTYPE).as_deref(), Some("f16"));
        assert_eq!(one(worker_args::DRAIN_TIMEOUT).as_deref(), Some("60s"));
        assert_eq!(one("--max-queue").as_deref(), Some("128"));
    }
}

#[test]
fn the_worker_parses_the_arguments_of_a_minimal_spec() {
    let md = deployment(1, None);
    let container = worker_container(&md, 0);
    let argv = command_line(&container);
    Cli::try_parse_from(&argv).unwrap_or_else(|err| panic!("the worker refuses {argv:?}:\n{err}"));
    // One shard has no peers: the worker refuses a peer list without shards (at start, after
    // parsing).
    assert_eq!(values(&argv, worker_args::PEERS), None);
    assert_eq!(values(&argv, worker_args::KV_CACHE_MEMORY), None);
    assert_eq!(values(&argv, worker_args::NO_PREFIX_CACHING), None);
}

#[test]
fn every_reserved_flag_is_a_serve_flag_of_the_worker() {
    let cli = Cli::command();
    let serve = cli
        .find_subcommand(worker_args::SERVE)
        .expect("the worker has a serve subcommand");
    let longs: Vec<String> = serve
        .get_arguments()
        .filter_map(|a| a.get_long())
        .map(|long| format!("--{long}"))
        .collect();
    for flag in worker_args::RESERVED
        .iter()
        .chain(latentserve_operator::crd::RESERVED_WORKER_FLAGS)
    {
        assert!(
            longs.iter().any(|l| l == flag),
            "{flag} is reserved but the worker's serve has no such flag"
        );
    }
}

/// `serve` flags that `serving.extraArgs` may set: tuning that changes no limit the spec sets
/// and nothing the shards of a group must agree on beyond what one pod template gives them all.
/// A new `serve` flag must be added here or to `worker_args::RESERVED`.
const USER_FLAGS: &[&str] = &[
    "--model-name",
    "--chat-template",
    "--max-tokens-per-step",
    "--block-size",
    "--max-queue",
    "--max-connections",
    "--idle-timeout",
    "--http-header-timeout",
    "--tls-handshake-timeout",
    "--expert-wire-dtype",
    "--expert-rpc-timeout",
    "--device",
    "--help",
];

#[test]
fn every_serve_flag_is_either_reserved_or_left_to_users() {
    let cli = Cli::command();
    let serve = cli.find_subcommand(worker_args::SERVE).unwrap();
    for long in serve.get_arguments().filter_map(|a| a.get_long()) {
        let flag = format!("--{long}");
        let reserved = worker_args::RESERVED.contains(&flag.as_str());
        let user = USER_FLAGS.contains(&flag.as_str());
        assert!(
            reserved != user,
            "{flag}: reserved {reserved}, left to users {user}; classify it exactly once"
        );
    }
}

#[test]
fn pod_field_references_expand_like_the_kubelet_does() {
    let mut md = deployment(2, None);
    md.spec.serving = Some(ServingSpec {
        extra_args: vec!["--model-name=$(POD_NAMESPACE)-$$(POD_NAME)-$(UNDEFINED)".into()],
        ..ServingSpec::default()
    });
    let container = worker_container(&md, 0);
    let argv = command_line(&container);
    assert_eq!(
        argv.last().unwrap(),
        "--model-name=models-$(POD_NAME)-$(UNDEFINED)"
    );
    Cli::try_parse_from(&argv).unwrap_or_else(|err| panic!("the worker refuses {argv:?}:\n{err}"));
}
