//! The operator's Prometheus metrics, named in one place, and the HTTP server for `/metrics`,
//! `/healthz` and `/readyz`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::crd::{AutoscalingMetric, ModelDeploymentStatus};

pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    deployments: IntGaugeVec,
    pub leader: IntGauge,
    /// Per autoscaled ModelDeployment (`namespace`, `name`).
    autoscaler_desired: IntGaugeVec,
    autoscaler_current: IntGaugeVec,
    /// Also `metric`: the signal the autoscaler holds at its target.
    autoscaler_signal: GaugeVec,
    /// Also `direction` (`up`, `down`).
    autoscaler_decisions: IntCounterVec,
    autoscaler_signal_errors: IntCounterVec,
    /// Per ModelDeployment under `spec.expertPlacement` (`namespace`, `name`).
    placement_version: IntGaugeVec,
    placement_imbalance: GaugeVec,
    placement_degraded: IntGaugeVec,
    placement_rebalances: IntCounterVec,
    /// Latest condition statuses per ModelDeployment (`namespace/name`), summed into `deployments`.
    conditions: Mutex<BTreeMap<String, Vec<(String, String)>>>,
    ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "latentserve_operator_reconciles_total",
                "Reconciles run, by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "latentserve_operator_reconcile_errors_total",
                "Failed reconciles, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "latentserve_operator_reconcile_duration_seconds",
                "Time one reconcile took",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["result"],
        )
        .expect("valid metric");
        let deployments = IntGaugeVec::new(
            Opts::new(
                "latentserve_operator_deployments",
                "ModelDeployments by condition type and status",
            ),
            &["condition", "status"],
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "latentserve_operator_leader",
            "1 while this process holds the leader lease and reconciles",
        )
        .expect("valid metric");
        let object = ["namespace", "name"];
        let autoscaler_desired = IntGaugeVec::new(
            Opts::new(
                "latentserve_operator_autoscaler_desired_groups",
                "Serving groups the autoscaler wants",
            ),
            &object,
        )
        .expect("valid metric");
        let autoscaler_current = IntGaugeVec::new(
            Opts::new(
                "latentserve_operator_autoscaler_current_groups",
                "Serving groups that exist and do not drain, as the autoscaler last saw them",
            ),
            &object,
        )
        .expect("valid metric");
        let autoscaler_signal = GaugeVec::new(
            Opts::new(
                "latentserve_operator_autoscaler_signal_value",
                "The target metric's average over the ready serving groups",
            ),
            &["namespace", "name", "metric"],
        )
        .expect("valid metric");
        let autoscaler_decisions = IntCounterVec::new(
            Opts::new(
                "latentserve_operator_autoscaler_decisions_total",
                "Changes of the serving group count the autoscaler decided, by direction",
            ),
            &["namespace", "name", "direction"],
        )
        .expect("valid metric");
        let autoscaler_signal_errors = IntCounterVec::new(
            Opts::new(
                "latentserve_operator_autoscaler_signal_errors_total",
                "Router pods whose autoscaling report could not be read",
            ),
            &object,
        )
        .expect("valid metric");
        let placement_version = IntGaugeVec::new(
            Opts::new(
                "latentserve_operator_expert_placement_version",
                "The expert placement version the serving groups are moved onto (0: the default layout)",
            ),
            &object,
        )
        .expect("valid metric");
        let placement_imbalance = GaugeVec::new(
            Opts::new(
                "latentserve_operator_expert_imbalance",
                "Busiest shard's routed expert tokens over the mean, summed over MoE layers and groups, in the last window (1: even)",
            ),
            &object,
        )
        .expect("valid metric");
        let placement_degraded = IntGaugeVec::new(
            Opts::new(
                "latentserve_operator_degraded_groups",
                "Serving groups that serve with a shard down, on redundant expert copies",
            ),
            &object,
        )
        .expect("valid metric");
        let placement_rebalances = IntCounterVec::new(
            Opts::new(
                "latentserve_operator_expert_rebalances_total",
                "Balanced expert placement versions the operator stored",
            ),
            &object,
        )
        .expect("valid metric");
        for collector in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_errors.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(deployments.clone()),
            Box::new(leader.clone()),
            Box::new(autoscaler_desired.clone()),
            Box::new(autoscaler_current.clone()),
            Box::new(autoscaler_signal.clone()),
            Box::new(autoscaler_decisions.clone()),
            Box::new(autoscaler_signal_errors.clone()),
            Box::new(placement_version.clone()),
            Box::new(placement_imbalance.clone()),
            Box::new(placement_degraded.clone()),
            Box::new(placement_rebalances.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            deployments,
            leader,
            autoscaler_desired,
            autoscaler_current,
            autoscaler_signal,
            autoscaler_decisions,
            autoscaler_signal_errors,
            placement_version,
            placement_imbalance,
            placement_degraded,
            placement_rebalances,
            conditions: Mutex::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
        }
    }

    /// Records the conditions of one ModelDeployment (`None` once it is gone).
    pub fn set_conditions(&self, key: &str, status: Option<&ModelDeploymentStatus>) {
        let mut all = self
            .conditions
            .lock()
            .expect("metrics lock is never poisoned");
        match status {
            Some(status) => {
                let pairs = status
                    .conditions
                    .iter()
                    .map(|c| (c.type_.clone(), c.status.clone()))
                    .collect();
                all.insert(key.to_owned(), pairs);
            }
            None => {
                all.remove(key);
            }
        }
        self.deployments.reset();
        for (type_, status) in all.values().flatten() {
            self.deployments.with_label_values(&[type_, status]).inc();
        }
    }

    /// Records one autoscaler pass of `namespace/name`.
    pub fn record_autoscaler(&self, namespace: &str, name: &str, pass: &AutoscalerPass<'_>) {
        let AutoscalerPass {
            current,
            desired,
            metric,
            value,
            direction,
        } = *pass;
        let object = [namespace, name];
        self.autoscaler_current
            .with_label_values(&object)
            .set(i64::from(current));
        self.autoscaler_desired
            .with_label_values(&object)
            .set(i64::from(desired));
        // One series per object: the one of the metric in use.
        for other in AutoscalingMetric::ALL {
            if other != metric || value.is_none() {
                let _ =
                    self.autoscaler_signal
                        .remove_label_values(&[namespace, name, other.as_str()]);
            }
        }
        if let Some(value) = value {
            self.autoscaler_signal
                .with_label_values(&[namespace, name, metric.as_str()])
                .set(value);
        }
        if let Some(direction) = direction {
            self.autoscaler_decisions
                .with_label_values(&[namespace, name, direction])
                .inc();
        }
    }

    /// Counts a router pod whose report could not be read.
    pub fn autoscaler_signal_error(&self, namespace: &str, name: &str) {
        self.autoscaler_signal_errors
            .with_label_values(&[namespace, name])
            .inc();
    }

    /// Drops the autoscaler's series of `namespace/name` (deleted, or autoscaling turned off).
    pub fn forget_autoscaler(&self, namespace: &str, name: &str) {
        let object = [namespace, name];
        let _ = self.autoscaler_current.remove_label_values(&object);
        let _ = self.autoscaler_desired.remove_label_values(&object);
        let _ = self.autoscaler_signal_errors.remove_label_values(&object);
        for metric in AutoscalingMetric::ALL {
            let _ = self
                .autoscaler_signal
                .remove_label_values(&[namespace, name, metric.as_str()]);
        }
        for direction in ["up", "down"] {
            let _ = self
                .autoscaler_decisions
                .remove_label_values(&[namespace, name, direction]);
        }
    }

    /// Records `status.expertPlacement` of `namespace/name`; `None` drops its series.
    pub fn record_placement(
        &self,
        namespace: &str,
        name: &str,
        status: Option<&crate::crd::ExpertPlacementStatus>,
    ) {
        let object = [namespace, name];
        let Some(status) = status else {
            let _ = self.placement_version.remove_label_values(&object);
            let _ = self.placement_imbalance.remove_label_values(&object);
            let _ = self.placement_degraded.remove_label_values(&object);
            let _ = self.placement_rebalances.remove_label_values(&object);
            return;
        };
        self.placement_version
            .with_label_values(&object)
            .set(status.version);
        self.placement_degraded
            .with_label_values(&object)
            .set(status.degraded_groups.len() as i64);
        match status.measured_imbalance {
            Some(imbalance) => self
                .placement_imbalance
                .with_label_values(&object)
                .set(imbalance),
            None => {
                let _ = self.placement_imbalance.remove_label_values(&object);
            }
        }
    }

    /// Counts a placement version the operator stored for `namespace/name`.
    pub fn placement_rebalanced(&self, namespace: &str, name: &str) {
        self.placement_rebalances
            .with_label_values(&[namespace, name])
            .inc();
    }

    /// Marks the process ready (`/readyz`): it reached the API server and runs or waits for the
    /// lease.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("metrics encode as text")
    }
}

/// What one autoscaler pass reports to the metrics.
#[derive(Debug, Clone, Copy)]
pub struct AutoscalerPass<'a> {
    pub current: i32,
    pub desired: i32,
    pub metric: AutoscalingMetric,
    /// `None`: nothing measured; the signal's series goes.
    pub value: Option<f64>,
    /// `up` or `down` when the count changes.
    pub direction: Option<&'a str>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The HTTP routes of the operator.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(serve_ready))
        .with_state(metrics)
}

async fn serve_metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        metrics.render(),
    )
}

async fn serve_ready(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Binds the metrics address; the server runs until the process exits.
pub async fn serve(address: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router(metrics)).await {
            tracing::error!(error = %err, "metrics server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Outcome, compute};
    use crate::test_support::demo;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    async fn get(address: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let code = response[9..12].parse().unwrap();
        let body = response
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        (code, body)
    }

    #[tokio::test]
    async fn serves_metrics_and_health_over_http() {
        let metrics = Arc::new(Metrics::new());
        let address = serve("127.0.0.1:0".parse().unwrap(), metrics.clone())
            .await
            .unwrap();
        metrics.reconciles.with_label_values(&["ok"]).inc();
        metrics.reconcile_errors.with_label_values(&["apply"]).inc();
        let status = compute(
            &demo(),
            &[],
            &crate::status::RouterObservation::default(),
            &Outcome::Applied,
            None,
            None,
            &Time(Timestamp::UNIX_EPOCH),
        );
        metrics.set_conditions("models/demo", Some(&status));

        assert_eq!(get(address, "/healthz").await.0, 200);
        assert_eq!(get(address, "/readyz").await.0, 503);
        metrics.set_ready(true);
        assert_eq!(get(address, "/readyz").await.0, 200);
        let (code, body) = get(address, "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            body.contains(r#"latentserve_operator_reconciles_total{result="ok"} 1"#),
            "{body}"
        );
        assert!(body.contains(r#"latentserve_operator_reconcile_errors_total{reason="apply"} 1"#));
        assert!(body.contains(
            r#"latentserve_operator_deployments{condition="Available",status="False"} 1"#
        ));

        metrics.set_conditions("models/demo", None);
        let (_, body) = get(address, "/metrics").await;
        assert!(
            !body.contains("latentserve_operator_deployments{"),
            "{body}"
        );

        let pass = AutoscalerPass {
            current: 1,
            desired: 3,
            metric: AutoscalingMetric::InFlightRequests,
            value: Some(12.5),
            direction: Some("up"),
        };
        metrics.record_autoscaler("models", "demo", &pass);
        metrics.autoscaler_signal_error("models", "demo");
        let (_, body) = get(address, "/metrics").await;
        for line in [
            r#"latentserve_operator_autoscaler_current_groups{name="demo",namespace="models"} 1"#,
            r#"latentserve_operator_autoscaler_desired_groups{name="demo",namespace="models"} 3"#,
            r#"latentserve_operator_autoscaler_signal_value{metric="InFlightRequests",name="demo",namespace="models"} 12.5"#,
            r#"latentserve_operator_autoscaler_decisions_total{direction="up",name="demo",namespace="models"} 1"#,
            r#"latentserve_operator_autoscaler_signal_errors_total{name="demo",namespace="models"} 1"#,
        ] {
            assert!(body.contains(line), "{line} in {body}");
        }
        let steady = AutoscalerPass {
            current: 3,
            value: None,
            direction: None,
            ..pass
        };
        metrics.record_autoscaler("models", "demo", &steady);
        let (_, body) = get(address, "/metrics").await;
        assert!(
            !body.contains("autoscaler_signal_value{"),
            "no signal, no series"
        );
        metrics.forget_autoscaler("models", "demo");
        let (_, body) = get(address, "/metrics").await;
        assert!(!body.contains("latentserve_operator_autoscaler_"), "{body}");
    }
}
