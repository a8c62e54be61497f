//! The router's command line as the operator writes it: one constant per flag of
//! `latentserve-router` that the operator sets, and [`RouterArgs`], the typed arguments that
//! render to the router container's `args`. Nothing else in the operator spells a router flag.

use crate::crd::RoutingPolicy;

/// The binary every router container runs.
pub const ROUTER_BINARY: &str = "latentserve-router";

/// Discover the workers from the EndpointSlices of this Service (its ready endpoints only).
pub const ENDPOINTS_SERVICE: &str = "--endpoints-service";
/// The ConfigMap (in `$POD_NAMESPACE`) that names the groups to drain (`draining-groups.json`).
pub const ROUTING_CONFIGMAP: &str = "--routing-configmap";
pub const WORKER_GRPC_PORT: &str = "--worker-grpc-port";
/// `0`: the workers serve no OpenAI HTTP API.
pub const WORKER_OPENAI_PORT: &str = "--worker-openai-port";
pub const GRPC_ADDR: &str = "--grpc-addr";
/// Empty: the router serves no OpenAI HTTP API.
pub const OPENAI_ADDR: &str = "--openai-addr";
pub const METRICS_ADDR: &str = "--metrics-addr";
pub const POLICY: &str = "--policy";
/// After SIGTERM, how long requests in flight may run before the router's ports close.
pub const DRAIN_TIMEOUT: &str = "--drain-timeout";
/// TLS on the router's client ports (`spec.tls` while the router runs).
pub const TLS_CERT: &str = "--tls-cert";
pub const TLS_KEY: &str = "--tls-key";
pub const TLS_CLIENT_CA: &str = "--tls-client-ca";

/// Everything a router pod is started with, typed; [`RouterArgs::render`] turns it into the
/// container's `args`. The namespace of the Service comes from `$POD_NAMESPACE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterArgs {
    /// The headless Service over the worker pods.
    pub endpoints_service: String,
    /// The ConfigMap of the draining groups.
    pub routing_configmap: String,
    pub worker_grpc_port: i32,
    /// `None` when the workers serve no OpenAI HTTP API.
    pub worker_openai_port: Option<i32>,
    pub grpc_addr: String,
    /// `None` when the router serves no OpenAI HTTP API.
    pub openai_addr: Option<String>,
    pub metrics_addr: String,
    pub policy: RoutingPolicy,
    pub drain_timeout_seconds: i64,
    /// `spec.tls`'s files, when the router terminates TLS.
    pub tls: Option<crate::worker_args::TlsFiles>,
}

impl RouterArgs {
    pub fn render(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut flag = |name: &str, value: String| {
            args.push(name.to_owned());
            args.push(value);
        };
        flag(ENDPOINTS_SERVICE, self.endpoints_service.clone());
        flag(ROUTING_CONFIGMAP, self.routing_configmap.clone());
        flag(WORKER_GRPC_PORT, self.worker_grpc_port.to_string());
        flag(
            WORKER_OPENAI_PORT,
            self.worker_openai_port.unwrap_or(0).to_string(),
        );
        flag(GRPC_ADDR, self.grpc_addr.clone());
        flag(OPENAI_ADDR, self.openai_addr.clone().unwrap_or_default());
        flag(METRICS_ADDR, self.metrics_addr.clone());
        flag(POLICY, self.policy.flag_value().to_owned());
        flag(DRAIN_TIMEOUT, format!("{}s", self.drain_timeout_seconds));
        if let Some(tls) = &self.tls {
            flag(TLS_CERT, tls.cert.clone());
            flag(TLS_KEY, tls.key.clone());
            if let Some(ca) = &tls.client_ca {
                flag(TLS_CLIENT_CA, ca.clone());
            }
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_openai_port_both_sides_say_so() {
        let args = RouterArgs {
            endpoints_service: "demo-workers".into(),
            routing_configmap: "demo-routing".into(),
            worker_grpc_port: 50051,
            worker_openai_port: None,
            grpc_addr: "0.0.0.0:50051".into(),
            openai_addr: None,
            metrics_addr: "0.0.0.0:9090".into(),
            policy: RoutingPolicy::RoundRobin,
            drain_timeout_seconds: 60,
            tls: None,
        }
        .render();
        assert_eq!(
            args,
            [
                "--endpoints-service",
                "demo-workers",
                "--routing-configmap",
                "demo-routing",
                "--worker-grpc-port",
                "50051",
                "--worker-openai-port",
                "0",
                "--grpc-addr",
                "0.0.0.0:50051",
                "--openai-addr",
                "",
                "--metrics-addr",
                "0.0.0.0:9090",
                "--policy",
                "round-robin",
                "--drain-timeout",
                "60s",
            ]
        );
    }
}
