//! `POST /api/v1/reload`: re-reads the config file and applies what can change live
//! (node admins only). The node does the work ([`Reload`]); this is its HTTP face.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::http::AppState;

/// What a reload did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// The sections and keys that changed and now apply (`auth`, `limits`, ...).
    pub applied: Vec<String>,
    /// Those that changed but apply only after a restart (`rtmp`, `limits.max_rtmp_connections`, ...).
    pub restart_required: Vec<String>,
}

/// Why a reload applied nothing: the new file's problems (`file: key: reason`), or why
/// there is nothing to re-read. The running config stays.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadFailed {
    pub error: String,
    pub problems: Vec<String>,
}

/// Re-reads and applies the config (implemented by the node).
pub trait Reload: Send + Sync {
    fn reload(&self) -> Result<ReloadReport, ReloadFailed>;
}

/// `POST /api/v1/reload`: 200 with the [`ReloadReport`], 422 with the new file's
/// problems (nothing applied), 409 when the node was started without a file.
pub(super) async fn reload(State(s): State<AppState>) -> Response {
    let Some(reloader) = s.reload.clone() else {
        return failed(
            StatusCode::CONFLICT,
            "this node was started without --config: there is nothing to re-read",
        );
    };
    match tokio::task::spawn_blocking(move || reloader.reload()).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(f)) if f.problems.is_empty() => failed(StatusCode::CONFLICT, &f.error),
        Ok(Err(f)) => (StatusCode::UNPROCESSABLE_ENTITY, Json(f)).into_response(),
        Err(e) => failed(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn failed(status: StatusCode, why: &str) -> Response {
    (status, Json(serde_json::json!({ "error": why }))).into_response()
}

/// The reloader the API calls, if the node has one.
pub type SharedReload = Option<Arc<dyn Reload>>;
