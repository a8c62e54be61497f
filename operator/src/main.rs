//! `latentserve-operator`: reconciles `ModelDeployment` objects into worker pods (`run`), or
//! prints the CRD (`crd`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use latentserve_operator::autoscaling::{self, fetch::HttpReports};
use latentserve_operator::capacity::GrpcModelInfo;
use latentserve_operator::crd;
use latentserve_operator::discovery::Features;
use latentserve_operator::leader::LeaseLock;
use latentserve_operator::metrics::{self, Metrics};
use latentserve_operator::policy::{self, Policy};
use latentserve_operator::reconcile::{self, Context};
use latentserve_operator::resources::BuildContext;

/// The latentserve Kubernetes operator.
#[derive(Debug, Parser)]
#[command(name = "latentserve-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the controller against the cluster of the kubeconfig (or the in-cluster account).
    Run(Box<RunArgs>),
    /// Prints the ModelDeployment CRD as YAML.
    Crd {
        /// Leave out the CEL `x-kubernetes-validations` rules, for clusters before 1.25, where
        /// server-side apply refuses the unknown field (the operator enforces the same rules).
        #[arg(long)]
        without_cel: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Watch ModelDeployments in this namespace only (all namespaces when unset).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Worker image for ModelDeployments that do not name one.
    #[arg(long, env = "LATENTSERVE_WORKER_IMAGE", default_value = concat!("latentserve-worker:", env!("CARGO_PKG_VERSION")))]
    worker_image: String,
    /// Image of the request router pods (one Deployment per ModelDeployment, `spec.router`).
    #[arg(long, env = "LATENTSERVE_ROUTER_IMAGE", default_value = concat!("latentserve-router:", env!("CARGO_PKG_VERSION")))]
    router_image: String,
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Run only while holding the leader Lease, so that several replicas can stand by.
    #[arg(long)]
    leader_election: bool,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "latentserve-operator")]
    leader_election_id: String,
    /// Host directories that `spec.model.hostPath.path` may be (or be below), comma-separated;
    /// `*` allows any path, an empty value none.
    #[arg(long, env = "LATENTSERVE_ALLOWED_HOST_PATH_PREFIXES", value_delimiter = ',', default_value = policy::DEFAULT_HOST_PATH_PREFIX)]
    allowed_host_path_prefixes: Vec<String>,
    /// Images that `spec.image` may name, comma-separated: repositories (any tag or digest),
    /// registry or path prefixes ending in `/`, or `*` for any. Default: the repository of
    /// --worker-image.
    #[arg(long, env = "LATENTSERVE_ALLOWED_IMAGES", value_delimiter = ',')]
    allowed_images: Option<Vec<String>>,
    /// Namespaces (labels, `key=value,...`) whose pods may reach the workers' metrics port;
    /// empty: any source.
    #[arg(
        long,
        env = "LATENTSERVE_METRICS_NAMESPACE_SELECTOR",
        default_value = ""
    )]
    metrics_namespace_selector: String,
    /// How often the autoscaler reads the routers and decides, per ModelDeployment with
    /// spec.autoscaling (a duration: 15s, 1m).
    #[arg(long, default_value = "15s", value_parser = parse_interval)]
    autoscale_interval: Duration,
    /// Log line format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    match autoscaling::parse_duration(text) {
        Some(interval) if !interval.is_zero() => Ok(interval),
        _ => Err(format!(
            "{text:?} is not a positive duration such as 15s or 1m"
        )),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube_runtime=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// This process's name in the leader Lease: the pod name in a cluster, host and pid elsewhere.
fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|| "operator".to_owned());
        format!("{host}-{}", std::process::id())
    })
}

/// A list flag without its empty entries (`--allowed-images=` is the empty list).
fn nonempty(list: Vec<String>) -> Vec<String> {
    list.into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let client = Client::try_default()
        .await
        .context("cannot configure a Kubernetes client (KUBECONFIG or in-cluster account)")?;
    let features = Features::discover(&client)
        .await
        .context("API discovery failed: cannot reach the Kubernetes API server")?;
    let skipped = features.downgrades();
    tracing::info!(version = %features.version, skipped = ?skipped, "discovered cluster features");

    let metrics = Arc::new(Metrics::new());
    let bound = metrics::serve(args.metrics_addr, metrics.clone())
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {}", args.metrics_addr))?;
    tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");
    metrics.set_ready(true);

    let ctx = Arc::new(
        Context::new(
            client.clone(),
            BuildContext {
                policy: Policy {
                    allowed_host_path_prefixes: nonempty(args.allowed_host_path_prefixes),
                    allowed_images: nonempty(args.allowed_images.unwrap_or_else(|| {
                        vec![policy::image_repository(&args.worker_image).to_owned()]
                    })),
                    metrics_namespace_selector: policy::parse_selector(
                        &args.metrics_namespace_selector,
                    )
                    .map_err(anyhow::Error::msg)
                    .context("--metrics-namespace-selector")?,
                    operator_namespace: std::env::var("POD_NAMESPACE").ok(),
                },
                worker_image: args.worker_image,
                router_image: args.router_image,
                features,
            },
            metrics.clone(),
            Arc::new(GrpcModelInfo::default()),
        )
        .with_autoscaler(args.autoscale_interval, Arc::new(HttpReports::default())),
    );

    if !args.leader_election {
        metrics.leader.set(1);
        reconcile::run(ctx, args.namespace).await;
        return Ok(());
    }

    let leases: Api<Lease> = Api::namespaced(client, &args.leader_election_namespace);
    let mut lock = LeaseLock::new(leases, &args.leader_election_id, &identity());
    tracing::info!(
        identity = lock.identity(),
        lease = args.leader_election_id,
        "waiting for the leader lease"
    );
    tokio::select! {
        () = lock.acquire() => {}
        () = shutdown_signal() => return Ok(()),
    }
    tracing::info!(identity = lock.identity(), "became the leader");
    metrics.leader.set(1);
    let lost = tokio::select! {
        () = reconcile::run(ctx, args.namespace) => false,
        () = lock.keep() => true,
    };
    metrics.leader.set(0);
    if lost {
        anyhow::bail!("lost the leader lease; exiting so that a restart starts as a standby");
    }
    lock.release()
        .await
        .context("cannot release the leader lease")?;
    Ok(())
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { without_cel } => {
            print!("{}", crd::crd_yaml(!without_cel));
            Ok(())
        }
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(run(*args)),
    }
}
