//! The egress API: list, create, get and stop RTMP pushes and recordings (admin only).

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::access::{denied, namespace_of, out_of_scope};
use super::http::{error, is_json, AppState};
use crate::auth::{AdminScope, Denied};

/// `GET /api/v1/egress`: the egress jobs (a namespace's admin: its namespace's).
pub(super) async fn egress_list(
    State(s): State<AppState>,
    Extension(scope): Extension<AdminScope>,
) -> impl IntoResponse {
    let mut jobs = s.egress.list();
    jobs.retain(|j| scope.covers(namespace_of(&j.stream)));
    Json(serde_json::json!({ "egress": jobs }))
}

/// The job `id`, if the caller's scope reaches its stream.
fn reachable(s: &AppState, scope: &AdminScope, id: &str) -> bool {
    s.egress
        .get(id)
        .is_some_and(|j| scope.covers(namespace_of(&j.stream)))
}

/// `POST /api/v1/egress` with `{stream, kind, url | format, template, ...}`: 201 with the
/// new egress (and its `Location`), or 400 listing every invalid field.
pub(super) async fn egress_create(
    State(s): State<AppState>,
    Extension(scope): Extension<AdminScope>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !is_json(&headers) {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(serde_json::json!({ "error": "Content-Type must be application/json" })),
        )
            .into_response();
    }
    let req: crate::egress::EgressRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "error": format!("invalid JSON: {e}") })),
            )
                .into_response()
        }
    };
    let namespace = match &req.room {
        Some(_) => crate::media::ROOM_NAMESPACE,
        None => namespace_of(&req.stream),
    };
    if let Some(r) = out_of_scope(&scope, namespace) {
        return r;
    }
    if let Some(room) = &req.room {
        if s.rooms.info(room).is_none() {
            return (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({ "error": format!("no room {room}") })),
            )
                .into_response();
        }
    }
    match s.egress.create(&req).await {
        Ok(status) => {
            let location = format!("/api/v1/egress/{}", status.id);
            (
                StatusCode::CREATED,
                [(header::LOCATION, location)],
                Json(status),
            )
                .into_response()
        }
        Err(crate::egress::CreateError::Invalid(errors)) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "invalid egress request", "fields": errors })),
        )
            .into_response(),
        Err(crate::egress::CreateError::Forbidden(why)) => {
            s.hub.metrics().count_refused("api", "egress_destination");
            denied(Denied {
                status: 403,
                reason: why,
            })
        }
        Err(crate::egress::CreateError::TooMany(n)) => {
            s.hub.metrics().count_refused("api", "limit");
            (
                StatusCode::TOO_MANY_REQUESTS,
                Json(serde_json::json!({ "error": format!("at most {n} egress jobs run at once ([egress] max_jobs)") })),
            )
                .into_response()
        }
    }
}

pub(super) async fn egress_get(
    State(s): State<AppState>,
    Extension(scope): Extension<AdminScope>,
    Path(id): Path<String>,
) -> Response {
    let job = s.egress.get(&id);
    match job.filter(|j| scope.covers(namespace_of(&j.stream))) {
        Some(status) => Json(status).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no egress {id}")),
    }
}

/// Stops the egress (its file finished, its publish ended) and returns its final status.
pub(super) async fn egress_delete(
    State(s): State<AppState>,
    Extension(scope): Extension<AdminScope>,
    Path(id): Path<String>,
) -> Response {
    if !reachable(&s, &scope, &id) {
        return error(StatusCode::NOT_FOUND, format!("no egress {id}"));
    }
    match s.egress.stop(&id).await {
        Some(status) => Json(status).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no egress {id}")),
    }
}
