//! Reading pods the node agent runs: readiness, addresses, and plain HTTP GETs of their ports
//! (`/metrics`, the router's `/v1/autoscaling`).

use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;

/// Whether the pod's Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `podIP:port` of the pod's container port `name`.
pub fn pod_port(pod: &Pod, name: &str) -> anyhow::Result<String> {
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .with_context(|| format!("{} has no podIP", pod.name_any()))?;
    let port = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.name.as_deref() == Some(name)))
        .map(|p| p.container_port)
        .with_context(|| format!("{} has no {name} port", pod.name_any()))?;
    Ok(format!("{ip}:{port}"))
}

/// `podIP:port` of the pod's gRPC port.
pub fn grpc_address(pod: &Pod) -> anyhow::Result<String> {
    pod_port(pod, "grpc")
}

/// The body of `GET path` on the pod's `metrics` port, over plain HTTP/1.1; anything but 200 is
/// an error.
pub async fn get_from_metrics_port(pod: &Pod, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let address = pod_port(pod, "metrics")?;
    let mut stream = tokio::net::TcpStream::connect(&address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .with_context(|| format!("{path} did not answer within 10 s"))??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{path} answered {head}");
    Ok(body.to_owned())
}

/// The sum of every sample of metric `name` in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.rsplit_once('}')?.1
            } else if rest.starts_with(' ') {
                rest
            } else {
                return None;
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}
