//! The HTTP error type: every failure becomes the JSON envelope
//! `{"error": {"code", "message", "details"?}}` with a 4xx or 5xx status.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use mamba_shared::blueprint::FieldError;
use mamba_shared::error::{ErrorBody, ErrorEnvelope};

use crate::files::FsError;
use crate::files::archive::ArchiveError;
use crate::files::pull::PullError;
use crate::rcon::RconError;
use crate::server::ServerError;
use crate::server::manager::CreateError;
use crate::tokens::TokenError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<FieldError>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        if self.status.is_server_error() {
            tracing::error!(error.code = self.code, "{}", self.message);
        }
        HttpResponse::build(self.status).json(ErrorEnvelope {
            error: ErrorBody {
                code: self.code.to_string(),
                message: self.message.clone(),
                details: self.details.clone(),
            },
        })
    }
}

impl From<CreateError> for ApiError {
    fn from(e: CreateError) -> ApiError {
        let message = e.to_string();
        match e {
            CreateError::Invalid(details) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                code: "validation_failed",
                message: details
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
                details,
            },
            CreateError::Duplicate(_) => ApiError::new(StatusCode::CONFLICT, "duplicate_id", message),
            CreateError::PortInUse { field, message } => ApiError {
                status: StatusCode::CONFLICT,
                code: "port_in_use",
                message: format!("{field}: {message}"),
                details: vec![FieldError { field, message }],
            },
            CreateError::ImageMissing { field, image } => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                code: "image_missing",
                details: vec![FieldError {
                    field,
                    message: format!("image {image} is not present on this node"),
                }],
                message,
            },
            CreateError::Docker(m) => ApiError::new(StatusCode::BAD_GATEWAY, "docker", m),
            CreateError::Internal(m) => ApiError::internal(m),
            CreateError::UnknownServer => ApiError::not_found("server"),
        }
    }
}

impl From<ServerError> for ApiError {
    fn from(e: ServerError) -> ApiError {
        match e {
            ServerError::NotRunning => ApiError::new(StatusCode::CONFLICT, "not_running", e.to_string()),
            ServerError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            ServerError::Failed(m) => ApiError::new(StatusCode::BAD_GATEWAY, "failed", m),
            ServerError::Docker(e) => ApiError::new(StatusCode::BAD_GATEWAY, "docker", e.to_string()),
            ServerError::Rcon(e) => {
                let status = match e {
                    RconError::Unavailable(_) | RconError::Timeout(_) | RconError::Io(_) => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    RconError::CommandTooLong => StatusCode::BAD_REQUEST,
                    RconError::AuthFailed | RconError::Protocol(_) => StatusCode::BAD_GATEWAY,
                };
                ApiError::new(status, "rcon", e.to_string())
            }
        }
    }
}

impl From<FsError> for ApiError {
    fn from(e: FsError) -> ApiError {
        let message = e.to_string();
        let (status, code) = match e {
            FsError::BadPath(_) | FsError::Escape(_) => (StatusCode::BAD_REQUEST, "invalid_path"),
            FsError::Symlink(_) => (StatusCode::BAD_REQUEST, "symlink"),
            FsError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            FsError::Exists(_) => (StatusCode::CONFLICT, "exists"),
            FsError::NotAFile(_) | FsError::NotADirectory(_) | FsError::IsADirectory(_) => {
                (StatusCode::BAD_REQUEST, "wrong_kind")
            }
            FsError::NotEmpty(_) => (StatusCode::CONFLICT, "not_empty"),
            FsError::Denied(_) => (StatusCode::FORBIDDEN, "denied"),
            FsError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            FsError::QuotaExceeded { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "quota_exceeded"),
            FsError::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "io"),
        };
        ApiError::new(status, code, message)
    }
}

impl From<ArchiveError> for ApiError {
    fn from(e: ArchiveError) -> ApiError {
        let message = e.to_string();
        match e {
            ArchiveError::Files(e) => e.into(),
            ArchiveError::Unsafe { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unsafe_archive", message)
            }
            ArchiveError::Bomb(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "archive_too_large", message)
            }
            ArchiveError::Unsupported(_) => {
                ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_archive", message)
            }
            ArchiveError::Corrupt(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "corrupt_archive", message)
            }
        }
    }
}

impl From<PullError> for ApiError {
    fn from(e: PullError) -> ApiError {
        let message = e.to_string();
        match e {
            PullError::Files(e) => e.into(),
            PullError::BadUrl(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_url", message),
            PullError::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden_address", message),
            PullError::Disabled => ApiError::new(StatusCode::FORBIDDEN, "pull_disabled", message),
            PullError::TooMany(_) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_pulls", message),
            PullError::Remote(_) => ApiError::new(StatusCode::BAD_GATEWAY, "remote", message),
            PullError::TooLarge(_) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message),
            PullError::Cancelled => ApiError::new(StatusCode::CONFLICT, "cancelled", message),
            PullError::TimedOut(_) => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timed_out", message),
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> ApiError {
        let status = match e {
            TokenError::Invalid(_) | TokenError::Expired | TokenError::NoKey => StatusCode::UNAUTHORIZED,
            _ => StatusCode::FORBIDDEN,
        };
        ApiError::new(status, "token_rejected", e.to_string())
    }
}
