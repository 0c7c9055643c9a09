//! The JSON error envelope every Mamba HTTP API answers with:
//! `{"error": {"code": "...", "message": "...", "details": [...]}}`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable, machine-readable, snake_case.
    pub code: String,
    /// For people; never contains secrets.
    pub message: String,
    /// Field-level problems, when the request was invalid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<crate::blueprint::FieldError>,
}
