//! The one error type of a reconcile, categorized for the error metric and the Event reason.

use crate::resources::OwnedKind;

/// A reconcile failure. Each variant keeps the API error it came from as its source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: OwnedKind,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting {kind} {name}: {source}")]
    Delete {
        kind: OwnedKind,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting Pod {name}: {source}")]
    DeletePod {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing {what}: {source}")]
    List {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("reading or writing the Secret {name}: {source}")]
    Secret {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
    /// Objects of the desired names exist and are not controlled by this ModelDeployment;
    /// nothing was applied and they were left as they are.
    #[error(
        "not controlled by this ModelDeployment, left as they are, nothing applied: {}; rename the ModelDeployment or remove them",
        objects.join(", ")
    )]
    Conflict { objects: Vec<String> },
    /// The object could not be read as a ModelDeployment; the text is the decoder's.
    #[error("the object does not match the CRD schema: {0}")]
    Malformed(String),
}

impl Error {
    /// The `reason` label of `latentserve_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "apply",
            Error::Delete { .. } | Error::DeletePod { .. } => "delete",
            Error::List { .. } => "list",
            Error::Secret { .. } => "secret",
            Error::Status(_) => "status",
            Error::Malformed(_) => "malformed",
            Error::Conflict { .. } => "conflict",
        }
    }

    /// The reason of the Degraded condition and of the Event.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Conflict { .. } => "ResourceConflict",
            _ => "ReconcileFailed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_labels_are_short_and_distinct() {
        let api = || kube::Error::LinesCodecMaxLineLengthExceeded;
        let labels = [
            Error::Apply {
                kind: OwnedKind::StatefulSet,
                name: "demo-0".into(),
                source: api(),
            }
            .metric_label(),
            Error::Delete {
                kind: OwnedKind::NetworkPolicy,
                name: "demo".into(),
                source: api(),
            }
            .metric_label(),
            Error::List {
                what: "Pods",
                source: api(),
            }
            .metric_label(),
            Error::Malformed("x".into()).metric_label(),
            Error::Status(api()).metric_label(),
        ];
        assert_eq!(labels, ["apply", "delete", "list", "malformed", "status"]);
    }

    #[test]
    fn the_api_error_stays_the_source() {
        let err = Error::Status(kube::Error::LinesCodecMaxLineLengthExceeded);
        let source = std::error::Error::source(&err).expect("a source");
        assert!(source.downcast_ref::<kube::Error>().is_some());
    }
}
