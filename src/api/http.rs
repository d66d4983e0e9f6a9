//! The HTTP router (axum on hyper): `GET /{ns}/{stream}.flv`, `/api/v1/*`, `/metrics`,
//! `/healthz` and the console at `/console` (`/` redirects there).
//!
//! Who may call what: playback and ingest (HTTP-FLV, WHIP, WHEP) ask [`Auth`] with the
//! request's token (`?token=` or `Authorization: Bearer`). The admin API (listing streams,
//! links, the cluster and egress; creating and deleting egress; kicking publishers) sits
//! behind [`admin_only`]: an admin token when `[auth]` has keys, else loopback clients only.
//! It also refuses browser requests from foreign origins, and JSON bodies must say so
//! (415), so no web page can drive it (`api::access`). The server loop ([`serve`],
//! `api::server`) bounds connections, the time to send headers (slowloris) and idle
//! connections.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;

use super::access::{admin_only, denied, node_admin_only, request_token, rooms_admin_only};
use super::admin::{cluster, links, node, stream_kick, streams, viewer_kick, viewers};
use super::egress::{egress_create, egress_delete, egress_get, egress_list};
use super::play::flv;
use super::rooms::{room_create, room_delete, room_events, room_get, room_list, room_token};
use super::route::{route, route_flv, route_webrtc};
pub use super::server::{serve, HttpLimits};
use super::webrtc::{preflight, session_delete, session_patch, whep_post, whip_post};
use crate::auth::Auth;
use crate::backbone::Backbone;
use crate::hub::{Hub, SubscribeError};

/// What the API says about this node.
#[derive(Clone, Debug, Serialize)]
pub struct NodeInfo {
    pub id: String,
    pub region: String,
    pub role: crate::config::Role,
    pub version: &'static str,
}

#[derive(Clone)]
pub struct AppState {
    pub hub: Arc<Hub>,
    pub node: NodeInfo,
    pub backbone: Option<Arc<Backbone>>,
    pub webrtc: Option<Arc<crate::webrtc::WebRtc>>,
    pub egress: Arc<crate::egress::Egress>,
    pub auth: Arc<Auth>,
    pub rooms: Arc<crate::rooms::Rooms>,
    /// Re-reads the config (`POST /api/v1/reload`); none without a config file.
    pub reload: super::reload::SharedReload,
}

pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/api/v1/streams", get(streams))
        .route(
            "/api/v1/streams/{namespace}/{stream}",
            axum::routing::delete(stream_kick),
        )
        .route("/api/v1/viewers", get(viewers))
        .route("/api/v1/viewers/{id}", axum::routing::delete(viewer_kick))
        .route("/api/v1/egress", get(egress_list).post(egress_create))
        .route("/api/v1/egress/{id}", get(egress_get).delete(egress_delete))
        .merge(
            Router::new()
                .route("/api/v1/links", get(links))
                .route("/api/v1/cluster", get(cluster))
                .route("/api/v1/reload", post(super::reload::reload))
                .route_layer(axum::middleware::from_fn(node_admin_only)),
        )
        .merge(
            Router::new()
                .route("/api/v1/rooms", get(room_list).post(room_create))
                .route("/api/v1/rooms/{id}", get(room_get).delete(room_delete))
                .route("/api/v1/rooms/{id}/tokens", post(room_token))
                .route_layer(axum::middleware::from_fn(rooms_admin_only)),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin_only,
        ));
    Router::new()
        .merge(admin)
        .route(
            "/",
            get(|| async { axum::response::Redirect::temporary("/console") }),
        )
        .route("/console", get(console))
        .route(
            "/console/mpegts.js",
            get(|| async {
                (
                    [
                        (
                            header::CONTENT_TYPE,
                            "application/javascript; charset=utf-8",
                        ),
                        (header::CACHE_CONTROL, "public, max-age=86400"),
                    ],
                    crate::api::console::MPEGTS_JS,
                )
            }),
        )
        .route(
            "/console/mpegts.LICENSE",
            get(|| async { crate::api::console::MPEGTS_LICENSE }),
        )
        .route(
            "/meet",
            get(|| async { Html(crate::api::console::MEETING) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/node", get(node))
        .route("/api/v1/route", get(route))
        .route("/api/v1/rooms/{id}/events", get(room_events))
        .route("/route/{namespace}/{file}", get(route_flv))
        .route(
            "/route/whep/{namespace}/{stream}",
            post(route_webrtc::<false>).options(preflight),
        )
        .route(
            "/route/whip/{namespace}/{stream}",
            post(route_webrtc::<true>).options(preflight),
        )
        .route(
            "/whep/{namespace}/{stream}",
            post(whep_post).options(preflight),
        )
        .route(
            "/whip/{namespace}/{stream}",
            post(whip_post).options(preflight),
        )
        .route(
            "/whip/{namespace}/{stream}/{session}",
            axum::routing::delete(session_delete)
                .patch(session_patch)
                .options(preflight),
        )
        .route(
            "/whep/{namespace}/{stream}/{session}",
            axum::routing::delete(session_delete)
                .patch(session_patch)
                .options(preflight),
        )
        .route("/{namespace}/{file}", get(flv))
        .with_state(state)
}

/// `GET /readyz`: 200 once the node has joined its mesh, else 503 and what it waits for.
async fn readyz(State(s): State<AppState>) -> Response {
    match s.backbone.as_ref().map(|b| b.ready()) {
        None | Some(Ok(())) => "ready\n".into_response(),
        Some(Err(why)) => error(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn console() -> Html<&'static str> {
    Html(crate::api::console::PAGE)
}

async fn metrics(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let token = request_token(&headers, query.as_deref());
    if let Err(d) = s.auth.check_metrics(token.as_deref()) {
        return denied(d);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.hub.metrics().render(),
    )
        .into_response()
}

pub(super) fn error(status: StatusCode, msg: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], msg + "\n").into_response()
}

/// 404 for a stream that is not live, 504 when upstream did not deliver it in time.
pub(super) fn subscribe_failed(e: SubscribeError) -> Response {
    let status = match e {
        SubscribeError::NotFound(_) => StatusCode::NOT_FOUND,
        SubscribeError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
    };
    error(status, e.to_string())
}

pub(super) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}
