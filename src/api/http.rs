//! The HTTP router (axum on hyper): `GET /{ns}/{stream}.flv`, `/api/v1/*`, `/metrics`,
//! `/healthz` and the console at `/`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, Instrument};

use crate::api::metrics::Proto;
use crate::backbone::Backbone;
use crate::hub::{Hub, Scope, SubscribeError};
use crate::media::StreamKey;

/// What the API says about this node.
#[derive(Clone, Debug, Serialize)]
pub struct NodeInfo {
    pub id: String,
    pub region: String,
    pub role: &'static str,
    pub version: &'static str,
}

#[derive(Clone)]
pub struct AppState {
    pub hub: Arc<Hub>,
    pub node: NodeInfo,
    pub backbone: Option<Arc<Backbone>>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(console))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/node", get(node))
        .route("/api/v1/streams", get(streams))
        .route("/api/v1/links", get(links))
        .route("/{namespace}/{file}", get(flv))
        .with_state(state)
}

/// Serves HTTP until `shutdown`.
pub async fn serve(listener: TcpListener, state: AppState, shutdown: CancellationToken) {
    let app = router(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!("http server failed: {e}");
    }
}

async fn console() -> Html<&'static str> {
    Html(crate::api::console::PAGE)
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.hub.metrics().render(),
    )
}

async fn node(State(s): State<AppState>) -> Json<NodeInfo> {
    Json(s.node.clone())
}

async fn streams(State(s): State<AppState>) -> impl IntoResponse {
    Json(serde_json::json!({ "streams": s.hub.list() }))
}

async fn links(State(s): State<AppState>) -> impl IntoResponse {
    let links = s.backbone.as_ref().map(|b| b.links()).unwrap_or_default();
    Json(serde_json::json!({ "links": links }))
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], msg + "\n").into_response()
}

async fn flv(
    State(s): State<AppState>,
    Path((namespace, file)): Path<(String, String)>,
) -> Response {
    let Some(name) = file.strip_suffix(".flv") else {
        return error(StatusCode::NOT_FOUND, "not found".into());
    };
    let key = match StreamKey::new(&namespace, name) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    s.hub.metrics().count_connection(Proto::Flv);
    let sub = match s.hub.subscribe(&key, Scope::Any).await {
        Ok(sub) => sub,
        Err(e @ SubscribeError::NotFound(_)) => return error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ SubscribeError::UpstreamTimeout(_)) => {
            return error(StatusCode::GATEWAY_TIMEOUT, e.to_string())
        }
    };
    let span = tracing::info_span!("flv", stream = %key);
    span.in_scope(|| info!("playing {key} over HTTP-FLV"));
    let counters = s.hub.metrics().proto(Proto::Flv);
    let rx = span.in_scope(|| {
        crate::play::flv::spawn_pump(sub, counters, s.hub.limits().viewer_write_timeout)
    });
    let body = futures_util::stream::unfold(rx, |mut rx| {
        { async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) } }
            .instrument(tracing::Span::none())
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "video/x-flv")
        .header(header::CACHE_CONTROL, "no-cache")
        .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}
