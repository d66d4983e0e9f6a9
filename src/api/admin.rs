//! The admin API's reads and kicks: this node, its streams and viewers, the backbone's
//! links, the cluster's view. Every route here sits behind `access::admin_only`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use tracing::info;

use super::access::{namespace_of, out_of_scope};
use super::http::{error, AppState, NodeInfo};
use crate::auth::AdminScope;
use crate::media::StreamKey;

/// `GET /api/v1/viewers`: every viewer (RTMP, HTTP-FLV, WHEP) with its id, stream,
/// protocol, client address and start.
/// A namespace's admin sees its namespace's viewers only.
pub(super) async fn viewers(
    State(s): State<AppState>,
    Extension(scope): Extension<AdminScope>,
) -> impl IntoResponse {
    let mut viewers = s.hub.viewers();
    viewers.retain(|v| scope.covers(namespace_of(&v.stream)));
    Json(serde_json::json!({ "viewers": viewers }))
}

/// `DELETE /api/v1/viewers/{id}`: disconnects a viewer (of the caller's namespace).
pub(super) async fn viewer_kick(
    State(s): State<AppState>,
    Extension(scope): Extension<AdminScope>,
    Path(id): Path<String>,
) -> Response {
    if s.hub
        .kick_viewer(&id, |stream| scope.covers(namespace_of(stream)))
    {
        info!(viewer = %id, "viewer kicked through the API");
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, format!("no viewer {id}"))
    }
}

/// `DELETE /api/v1/streams/{ns}/{name}`: ends a local publish (the publisher is told why
/// and disconnected).
pub(super) async fn stream_kick(
    State(s): State<AppState>,
    Extension(scope): Extension<AdminScope>,
    Path((namespace, stream)): Path<(String, String)>,
) -> Response {
    let key = match StreamKey::new(&namespace, &stream) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Some(r) = out_of_scope(&scope, &namespace) {
        return r;
    }
    if s.hub.evict(&key, "stopped by the operator") {
        info!(stream = %key, "publisher kicked through the API");
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            format!("{key} is not published on this node"),
        )
    }
}

pub(super) async fn node(State(s): State<AppState>) -> Json<NodeInfo> {
    Json(s.node.clone())
}

/// `GET /api/v1/streams`: the live streams (a namespace's admin: its namespace's).
pub(super) async fn streams(
    State(s): State<AppState>,
    Extension(scope): Extension<AdminScope>,
) -> impl IntoResponse {
    let mut streams = s.hub.list();
    streams.retain(|st| scope.covers(st.stream.namespace()));
    Json(serde_json::json!({ "streams": streams }))
}

pub(super) async fn links(State(s): State<AppState>) -> impl IntoResponse {
    let links = s.backbone.as_ref().map(|b| b.links()).unwrap_or_default();
    Json(serde_json::json!({ "links": links }))
}

/// `GET /api/v1/cluster`: this node's view of the cluster: its links (RTT, loss, bytes),
/// the stream directory (which origin announced what), the streams it pulls and from whom
/// (on an edge: which origin serves it), and the streams published here.
pub(super) async fn cluster(State(s): State<AppState>) -> impl IntoResponse {
    let (links, directory) = match &s.backbone {
        Some(b) => (b.links(), b.directory()),
        None => (Vec::new(), Vec::new()),
    };
    let directory: Vec<_> = directory
        .into_iter()
        .map(|(stream, origin)| serde_json::json!({ "stream": stream, "origin": origin }))
        .collect();
    let mut pulls = Vec::new();
    let mut published = Vec::new();
    for st in s.hub.list() {
        match st.source {
            crate::hub::Source::Relay { node } => {
                pulls.push(serde_json::json!({ "stream": st.stream, "upstream": node }))
            }
            crate::hub::Source::Local => published.push(st.stream),
            crate::hub::Source::Bridge { .. } => {}
        }
    }
    let nodes = s
        .backbone
        .as_ref()
        .map(|b| b.node_records())
        .unwrap_or_default();
    let regions: Vec<_> = crate::cluster::route::region_rtts(&nodes)
        .into_iter()
        .map(|((a, b), rtt)| serde_json::json!({ "regions": [a, b], "rtt_ms": rtt }))
        .collect();
    Json(serde_json::json!({
        "node": s.node,
        "nodes": nodes,
        "regions": regions,
        "links": links,
        "directory": directory,
        "pulls": pulls,
        "published": published,
    }))
}
