//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP
//! status the official SDKs turn into their exception classes.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::SubmitError;
use crate::engine::request::GenerationError;
use crate::server::validate::Invalid;

/// An error answer: its status, a message naming the problem, and the field at fault if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

impl ApiError {
    /// 400: a field breaks a rule; `param` names it.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// 400 from a shared check whose message already names the field.
    pub fn from_invalid(error: Invalid) -> Self {
        let param = error
            .0
            .split([':', '[', ' '])
            .next()
            .map(str::to_owned)
            .filter(|field| !field.is_empty());
        Self {
            status: StatusCode::BAD_REQUEST,
            message: error.0,
            param,
        }
    }

    /// 400: the request body is not JSON of the expected shape.
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: None,
        }
    }

    /// 404: the request names a model this worker does not serve.
    pub fn unknown_model(asked: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{asked}` does not exist; this server serves `{served}`"),
            param: Some("model".into()),
        }
    }

    /// 503: loading, draining or stopped.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            param: None,
        }
    }

    /// 500: something the client could not have prevented.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            param: None,
        }
    }

    fn kind(&self) -> (&'static str, Option<&'static str>) {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => {
                ("invalid_request_error", None)
            }
            StatusCode::NOT_FOUND => ("invalid_request_error", Some("model_not_found")),
            StatusCode::TOO_MANY_REQUESTS => ("rate_limit_error", Some("queue_full")),
            StatusCode::SERVICE_UNAVAILABLE => ("service_unavailable_error", None),
            StatusCode::GATEWAY_TIMEOUT => ("timeout_error", None),
            _ => ("server_error", None),
        }
    }

    /// The JSON body, also sent as the data of a failed stream's last event.
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = self.kind();
        serde_json::to_value(ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind,
                param: self.param.as_deref(),
                code,
            },
        })
        .unwrap_or_default()
    }
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> Self {
        let status = match error {
            SubmitError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            SubmitError::Draining | SubmitError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self {
            status,
            message: error.to_string(),
            param: None,
        }
    }
}

impl From<GenerationError> for ApiError {
    fn from(error: GenerationError) -> Self {
        let status = match error {
            GenerationError::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
            GenerationError::TooLongForCache { .. } => StatusCode::BAD_REQUEST,
            GenerationError::Model(_) => StatusCode::INTERNAL_SERVER_ERROR,
            GenerationError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self {
            status,
            message: error.to_string(),
            param: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // The queue drains at the engine's pace; a second is a sensible first back-off.
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_openais_shape() {
        let error = ApiError::invalid("temperature", "temperature must be >= 0, got -1");
        assert_eq!(
            error.body(),
            serde_json::json!({"error": {
                "message": "temperature must be >= 0, got -1",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": null,
            }})
        );
        assert_eq!(
            ApiError::unknown_model("gpt-4", "demo").body()["error"]["code"],
            "model_not_found"
        );
    }

    #[test]
    fn shared_checks_name_their_param() {
        let error = ApiError::from_invalid(Invalid("stop[1] is empty".into()));
        assert_eq!(error.param.as_deref(), Some("stop"));
        let error = ApiError::from_invalid(Invalid("max_tokens must be at least 1".into()));
        assert_eq!(error.param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn engine_refusals_map_to_their_statuses() {
        assert_eq!(
            ApiError::from(SubmitError::QueueFull { max_queue: 4 }).status,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            ApiError::from(SubmitError::Draining).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ApiError::from(GenerationError::TooLongForCache { needed: 9, pool: 4 }).status,
            StatusCode::BAD_REQUEST
        );
    }
}
