//! Reads a router pod's `GET /v1/autoscaling` report over plain HTTP/1.1 (the router's metrics
//! port), with a deadline and a bound on the body. [`ReportSource`] lets the reconciler tests
//! answer with fixed reports instead.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::signal::RouterReport;

/// The path of the report on the router's metrics port.
pub const PATH: &str = "/v1/autoscaling";
/// How long one router may take to answer (the contract's 2 s).
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// The largest report read: a few hundred bytes per group, and at most 1024 groups.
const MAX_BODY_BYTES: usize = 1 << 20;

/// Why a router's report could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("GET http://{address}{PATH}: no answer within {seconds}s")]
    Timeout { address: String, seconds: f64 },
    #[error("GET http://{address}{PATH}: {message}")]
    Http { address: String, message: String },
    #[error("GET http://{address}{PATH}: status {status}")]
    Status { address: String, status: u16 },
    #[error("GET http://{address}{PATH}: not the autoscaling report: {source}")]
    Decode {
        address: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Where reports come from: the routers over HTTP, or a test's fixed answers.
pub trait ReportSource: Send + Sync {
    /// The report of the router at `address` (`IP:PORT`).
    fn report<'a>(
        &'a self,
        address: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<RouterReport, FetchError>> + Send + 'a>>;
}

/// The routers' reports over HTTP. One client (and connection pool) for every router.
#[derive(Clone)]
pub struct HttpReports {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl Default for HttpReports {
    fn default() -> Self {
        Self::with_timeout(TIMEOUT)
    }
}

impl HttpReports {
    pub fn with_timeout(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    async fn get(&self, address: &str) -> Result<RouterReport, FetchError> {
        let http = |message: String| FetchError::Http {
            address: address.to_owned(),
            message,
        };
        let uri = format!("http://{address}{PATH}")
            .parse::<hyper::Uri>()
            .map_err(|e| http(e.to_string()))?;
        let response = self
            .client
            .get(uri)
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status {
                address: address.to_owned(),
                status: status.as_u16(),
            });
        }
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| http(format!("reading the body: {e}")))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|source| FetchError::Decode {
            address: address.to_owned(),
            source,
        })
    }
}

impl ReportSource for HttpReports {
    fn report<'a>(
        &'a self,
        address: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<RouterReport, FetchError>> + Send + 'a>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.get(address))
                .await
                .unwrap_or_else(|_| {
                    Err(FetchError::Timeout {
                        address: address.to_owned(),
                        seconds: self.timeout.as_secs_f64(),
                    })
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::get;

    async fn serve(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, router).await });
        address
    }

    #[tokio::test]
    async fn reads_a_report_and_names_what_went_wrong_otherwise() {
        let address = serve(
            Router::new()
                .route(
                    PATH,
                    get(|| async {
                        (
                            [("content-type", "application/json")],
                            r#"{"held_requests": 2, "idle_seconds": 0, "groups": [{"group": "demo-0", "in_flight_requests": 4}]}"#,
                        )
                    }),
                )
                .route("/broken/v1/autoscaling", get(|| async { "not json" })),
        )
        .await;
        let reports = HttpReports::default();
        let report = reports.report(&address).await.unwrap();
        assert_eq!(report.held_requests, 2);
        assert_eq!(report.groups[0].in_flight_requests, 4);

        let err = reports
            .report(&format!("{address}/broken"))
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Decode { .. }), "{err}");

        let missing = serve(Router::new()).await;
        let err = reports.report(&missing).await.unwrap_err();
        assert!(
            matches!(err, FetchError::Status { status: 404, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_slow_or_absent_router_is_an_error_within_the_deadline() {
        let slow = serve(Router::new().route(
            PATH,
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "{}"
            }),
        ))
        .await;
        let reports = HttpReports::with_timeout(Duration::from_millis(200));
        let err = reports.report(&slow).await.unwrap_err();
        assert!(matches!(err, FetchError::Timeout { .. }), "{err}");

        // Nothing listens there (the port was just freed).
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().to_string()
        };
        let err = reports.report(&closed).await.unwrap_err();
        assert!(
            matches!(err, FetchError::Http { .. } | FetchError::Timeout { .. }),
            "{err}"
        );
    }
}
