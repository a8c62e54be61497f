//! Reads a router pod's `GET /v1/autoscaling` report over plain HTTP/1.1 (the router's metrics
//! port), with a deadline and a bound on the body. [`ReportSource`] lets the reconciler tests
//! answer with fixed reports instead.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::signal::RouterReport;
use crate::http_get::{GetError, HttpGet};

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
    http: HttpGet,
}

impl Default for HttpReports {
    fn default() -> Self {
        Self::with_timeout(TIMEOUT)
    }
}

impl HttpReports {
    pub fn with_timeout(timeout: Duration) -> Self {
        Self {
            http: HttpGet::new(timeout),
        }
    }

    async fn get(&self, address: &str) -> Result<RouterReport, FetchError> {
        let address_owned = || address.to_owned();
        let body = self
            .http
            .get(address, PATH, MAX_BODY_BYTES)
            .await
            .map_err(|e| match e {
                GetError::Timeout { seconds } => FetchError::Timeout {
                    address: address_owned(),
                    seconds,
                },
                GetError::Status(status) => FetchError::Status {
                    address: address_owned(),
                    status,
                },
                GetError::Http(message) => FetchError::Http {
                    address: address_owned(),
                    message,
                },
            })?;
        serde_json::from_slice(&body).map_err(|source| FetchError::Decode {
            address: address_owned(),
            source,
        })
    }
}

impl ReportSource for HttpReports {
    fn report<'a>(
        &'a self,
        address: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<RouterReport, FetchError>> + Send + 'a>> {
        Box::pin(self.get(address))
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
