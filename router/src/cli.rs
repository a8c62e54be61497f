//! `latentserve-router`'s command line and its run: discover the workers, serve, drain on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use latentserve_worker::cli::parse::{OptionalAddr, parse_duration, parse_optional_addr};
use latentserve_worker::server::connections::{ConnectionLimits, DEFAULT_MAX_CONNECTIONS};
use latentserve_worker::server::tls::TlsFiles;

use crate::discovery::{WorkerPorts, follow_service, static_endpoints};
use crate::hold::{DEFAULT_HOLD_QUEUE, HoldConfig};
use crate::metrics::RouterMetrics;
use crate::policy::Policy;
use crate::pool::Pool;
use crate::server::{RouterAddrs, RunningRouter};

/// Routes each request of a ModelDeployment's clients to the worker that holds most of its
/// prompt in its prefix cache, within bounded loads.
#[derive(Debug, Clone, Parser)]
#[command(name = "latentserve-router", version)]
pub struct RouterArgs {
    /// The workers' gRPC addresses, HOST:PORT,... (without Kubernetes: tests, benchmarks).
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "endpoints_service",
        required_unless_present = "endpoints_service"
    )]
    pub endpoints: Vec<String>,
    /// The workers' OpenAI API addresses, HOST:PORT,..., one per `--endpoints` entry in the same
    /// order (default: the same hosts at `--worker-openai-port`).
    #[arg(long, value_delimiter = ',', requires = "endpoints")]
    pub openai_endpoints: Vec<String>,
    /// Discover the workers from the EndpointSlices of this Service (only ready endpoints).
    #[arg(long)]
    pub endpoints_service: Option<String>,
    /// Namespace of `--endpoints-service` and `--routing-configmap`.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Stop sending new requests to the serving groups that this ConfigMap's key
    /// `draining-groups.json` lists (the operator's scale-down drain), e.g. demo-routing.
    // `requires` alone is waived when `--endpoints` (which conflicts with the service) is given.
    #[arg(long, requires = "endpoints_service", conflicts_with = "endpoints")]
    pub routing_configmap: Option<String>,
    /// Requests held while no worker can take them (scale from zero), e.g. 256; beyond, new ones
    /// get RESOURCE_EXHAUSTED / 429 at once. 0: none is held, they get UNAVAILABLE / 503.
    #[arg(long, default_value_t = DEFAULT_HOLD_QUEUE)]
    pub hold_queue: usize,
    /// The longest a request is held waiting for a worker (never past the client's gRPC
    /// deadline), e.g. 5m.
    #[arg(long, default_value = "300s", value_parser = parse_positive_duration)]
    pub hold_timeout: Duration,
    /// The workers' gRPC port (an EndpointSlice port named `grpc` wins).
    #[arg(long, default_value_t = 50051)]
    pub worker_grpc_port: u16,
    /// The workers' OpenAI API port (an EndpointSlice port named `http` wins); 0: they serve none.
    #[arg(long, default_value_t = 8000)]
    pub worker_openai_port: u16,
    /// Where the router serves gRPC (`latentserve.v1.Inference`, health, reflection).
    #[arg(long, default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// Where the router serves the OpenAI-compatible API ('' to turn it off).
    #[arg(long, default_value = "0.0.0.0:8000", value_parser = parse_optional_addr)]
    pub openai_addr: OptionalAddr,
    /// Where the router serves /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// How requests are spread over the workers.
    #[arg(long, value_enum, default_value_t = Policy::PrefixAware)]
    pub policy: Policy,
    /// Open connections each client port keeps; more are closed at once.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// How long a connection may stay open with no request in flight (gRPC and OpenAI ports),
    /// e.g. 5m; 0 keeps idle connections open.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// How long an HTTP/1 client of the OpenAI port has to send a request's headers.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,
    /// TLS on the gRPC and OpenAI ports: the certificate chain (PEM, leaf first), e.g. a
    /// cert-manager Secret's tls.crt. Reloaded when the file changes.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM), e.g. tls.key.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Require client certificates signed by these CAs (PEM), e.g. ca.crt: mutual TLS.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// How long a client has to finish its TLS handshake.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// After SIGTERM, how long requests in flight may run before the ports close (e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// A duration that is not zero: holding a request for no time is `--hold-queue 0`.
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!("`{text}`: give a duration above zero"));
    }
    Ok(duration)
}

impl RouterArgs {
    fn hold(&self) -> HoldConfig {
        HoldConfig {
            capacity: self.hold_queue,
            timeout: self.hold_timeout,
        }
    }

    fn ports(&self) -> WorkerPorts {
        WorkerPorts {
            grpc: self.worker_grpc_port,
            openai: (self.worker_openai_port != 0).then_some(self.worker_openai_port),
        }
    }

    fn addrs(&self) -> RouterAddrs {
        RouterAddrs {
            grpc: self.grpc_addr,
            openai: if self.worker_openai_port == 0 {
                None
            } else {
                self.openai_addr.0
            },
            metrics: self.metrics_addr,
            connections: ConnectionLimits {
                max_connections: self.max_connections as usize,
                handshake_timeout: self.tls_handshake_timeout,
                idle_timeout: (!self.idle_timeout.is_zero()).then_some(self.idle_timeout),
            },
            http_header_timeout: self.http_header_timeout,
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                }),
                _ => None,
            },
        }
    }
}

/// Starts the router: the pool, discovery, the servers. Used by `main` and by in-process tests.
pub async fn start(args: &RouterArgs) -> anyhow::Result<RunningRouter> {
    let metrics = Arc::new(RouterMetrics::new().context("registering metrics")?);
    let pool = Pool::new(args.policy, args.hold(), metrics);
    if let Some(service) = &args.endpoints_service {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API for --endpoints-service (KUBECONFIG or the pod's service account)")?;
        if let Some(configmap) = &args.routing_configmap {
            let (client, namespace, configmap, pool) = (
                client.clone(),
                args.namespace.clone(),
                configmap.clone(),
                pool.clone(),
            );
            tokio::spawn(async move {
                crate::routing::follow_routing_configmap(client, &namespace, &configmap, pool)
                    .await;
            });
        }
        let (namespace, service, ports, pool) = (
            args.namespace.clone(),
            service.clone(),
            args.ports(),
            pool.clone(),
        );
        tokio::spawn(async move {
            if let Err(err) = follow_service(client, &namespace, &service, ports, pool).await {
                tracing::error!(error = %err, %namespace, %service, "cannot watch the workers' EndpointSlices; exiting");
                std::process::exit(1);
            }
        });
    } else {
        let endpoints = static_endpoints(&args.endpoints, &args.openai_endpoints, args.ports())
            .map_err(anyhow::Error::msg)?;
        if endpoints.is_empty() {
            bail!("--endpoints: give at least one worker address");
        }
        pool.set_endpoints(endpoints);
    }
    RunningRouter::start(&args.addrs(), pool)
        .await
        .context("starting the router's servers")
}

/// Runs until SIGTERM or Ctrl-C, then drains.
pub async fn run(args: RouterArgs) -> anyhow::Result<()> {
    let router = start(&args).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C")?,
    }
    tracing::info!("shutdown signal received; draining");
    router.drain(args.drain_timeout).await;
    tracing::info!("drained");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_have_the_workers_defaults() {
        let args = RouterArgs::try_parse_from(["latentserve-router", "--endpoints", "127.0.0.1:1"])
            .unwrap();
        assert_eq!(args.grpc_addr.to_string(), "0.0.0.0:50051");
        assert_eq!(args.openai_addr.0.unwrap().to_string(), "0.0.0.0:8000");
        assert_eq!(args.metrics_addr.to_string(), "0.0.0.0:9090");
        assert_eq!(args.policy, Policy::PrefixAware);
        assert_eq!(args.hold(), HoldConfig::default());
        assert_eq!(args.routing_configmap, None);
        let off = RouterArgs::try_parse_from([
            "latentserve-router",
            "--endpoints",
            "127.0.0.1:1",
            "--worker-openai-port",
            "0",
        ])
        .unwrap();
        assert_eq!(off.addrs().openai, None);
        assert!(RouterArgs::try_parse_from(["latentserve-router"]).is_err());
        let held = RouterArgs::try_parse_from([
            "latentserve-router",
            "--endpoints-service",
            "demo-workers",
            "--routing-configmap",
            "demo-routing",
            "--hold-queue",
            "0",
            "--hold-timeout",
            "2m",
        ])
        .unwrap();
        assert_eq!(held.routing_configmap.as_deref(), Some("demo-routing"));
        assert_eq!(
            held.hold(),
            HoldConfig {
                capacity: 0,
                timeout: Duration::from_secs(120)
            }
        );
        for refused in [
            // The routing ConfigMap is read next to the EndpointSlices only.
            &["--endpoints", "a:1", "--routing-configmap", "demo-routing"][..],
            &["--endpoints", "a:1", "--hold-timeout", "0s"][..],
            &["--endpoints", "a:1", "--hold-queue", "-1"][..],
        ] {
            let words = std::iter::once("latentserve-router").chain(refused.iter().copied());
            assert!(RouterArgs::try_parse_from(words).is_err(), "{refused:?}");
        }
        assert!(
            RouterArgs::try_parse_from([
                "latentserve-router",
                "--endpoints",
                "a:1",
                "--endpoints-service",
                "x"
            ])
            .is_err()
        );
    }
}
