//! The HTTP router (axum on hyper): `GET /{ns}/{stream}.flv`, `/api/v1/*`, `/metrics`,
//! `/healthz` and the console at `/`.
//!
//! Who may call what: playback and ingest (HTTP-FLV, WHIP, WHEP) ask [`Auth`] with the
//! request's token (`?token=` or `Authorization: Bearer`). The admin API (listing streams,
//! links, the cluster and egress; creating and deleting egress; kicking publishers) sits
//! behind [`admin_only`]: an admin token when `[auth]` has keys, else loopback clients only.
//! It also refuses browser requests from foreign origins, and JSON bodies must say so
//! (415), so no web page can drive it (`api::access`). The server loop ([`serve`],
//! `api::server`) bounds connections, the time to send headers (slowloris) and idle
//! connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tracing::{info, Instrument};

use super::access::{admin_only, admit, authorize, denied, request_token};
pub use super::server::{serve, HttpLimits};
use crate::auth::hooks::EventKind;
use crate::auth::{Action as AuthAction, Auth, Denied};
use crate::backbone::Backbone;
use crate::hub::{Hub, SubscribeError};
use crate::media::{Codec, StreamKey};
use crate::metrics::Proto;

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
    pub webrtc: Option<Arc<crate::webrtc::WebRtc>>,
    pub egress: Arc<crate::egress::Egress>,
    pub auth: Arc<Auth>,
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
        .route("/api/v1/links", get(links))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/egress", get(egress_list).post(egress_create))
        .route("/api/v1/egress/{id}", get(egress_get).delete(egress_delete))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin_only,
        ));
    Router::new()
        .merge(admin)
        .route("/", get(console))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/node", get(node))
        .route("/api/v1/route", get(route))
        .route("/route/{namespace}/{file}", get(route_flv))
        .route(
            "/route/whep/{namespace}/{stream}",
            post(route_whep).options(preflight),
        )
        .route(
            "/route/whip/{namespace}/{stream}",
            post(route_whip).options(preflight),
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

/// `GET /api/v1/viewers`: every viewer (RTMP, HTTP-FLV, WHEP) with its id, stream,
/// protocol, client address and start.
async fn viewers(State(s): State<AppState>) -> impl IntoResponse {
    Json(serde_json::json!({ "viewers": s.hub.viewers() }))
}

/// `DELETE /api/v1/viewers/{id}`: disconnects a viewer.
async fn viewer_kick(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    if s.hub.kick_viewer(&id) {
        info!(viewer = %id, "viewer kicked through the API");
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, format!("no viewer {id}"))
    }
}

/// `DELETE /api/v1/streams/{ns}/{name}`: ends a local publish (the publisher is told why
/// and disconnected).
async fn stream_kick(
    State(s): State<AppState>,
    Path((namespace, stream)): Path<(String, String)>,
) -> Response {
    let key = match StreamKey::new(&namespace, &stream) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
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

/// `GET /api/v1/cluster`: this node's view of the cluster: its links (RTT, loss, bytes),
/// the stream directory (which origin announced what), the streams it pulls and from whom
/// (on an edge: which origin serves it), and the streams published here.
async fn cluster(State(s): State<AppState>) -> impl IntoResponse {
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

#[derive(serde::Deserialize)]
struct RouteQuery {
    stream: Option<String>,
    region: Option<String>,
    action: Option<String>,
}

/// Where a client should go: `ns/name`, its region, play or publish.
struct RouteAsk {
    key: StreamKey,
    region: String,
    action: Action,
}

use crate::cluster::route::{Action, Choice};

impl RouteAsk {
    /// The client's region: `?region=`, else `X-Meshcast-Region`, else this node's. A
    /// region no node is in counts as this node's.
    fn new(
        s: &AppState,
        key: StreamKey,
        region: Option<String>,
        headers: &HeaderMap,
        action: Action,
    ) -> RouteAsk {
        let region = region
            .or_else(|| {
                headers
                    .get("x-meshcast-region")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| s.node.region.clone());
        RouteAsk {
            key,
            region,
            action,
        }
    }

    /// The ranked choices, best first (empty: nowhere to go).
    fn choices(&self, s: &AppState) -> Vec<Choice> {
        let records = s
            .backbone
            .as_ref()
            .map(|b| b.node_records())
            .unwrap_or_default();
        crate::cluster::route::route(
            &records,
            &self.key,
            &self.region,
            &s.node.region,
            self.action,
        )
    }
}

/// `GET /api/v1/route?stream=ns/name&region=r[&action=play|publish]`: the best node for a
/// client in region `r` (nearest region by measured RTT, then least loaded, then one that
/// already has the stream) with its URLs, and the other candidates in order.
async fn route(
    State(s): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<RouteQuery>,
) -> Response {
    let Some(key) = q
        .stream
        .as_deref()
        .and_then(|st| st.split_once('/'))
        .and_then(|(ns, name)| StreamKey::new(ns, name).ok())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "stream=namespace/name is required".into(),
        );
    };
    let action = match q.action.as_deref() {
        None | Some("play") => Action::Play,
        Some("publish") => Action::Publish,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("action must be play or publish, not {other}"),
            )
        }
    };
    let ask = RouteAsk::new(&s, key, q.region, &headers, action);
    let choices = ask.choices(&s);
    let Some(best) = choices.first() else {
        return with_cors(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no node can take this client now".into(),
        ));
    };
    let (ns, name) = (ask.key.namespace(), ask.key.name());
    let urls = match action {
        Action::Play => serde_json::json!({
            "flv": format!("{}/{ns}/{name}.flv", best.http_url),
            "whep": format!("{}/whep/{ns}/{name}", best.http_url),
            "rtmp": format!("{}/{ns}/{name}", best.rtmp_url),
        }),
        Action::Publish => serde_json::json!({
            "whip": format!("{}/whip/{ns}/{name}", best.http_url),
            "rtmp": format!("{}/{ns}/{name}", best.rtmp_url),
        }),
    };
    with_cors(
        Json(serde_json::json!({
            "stream": ask.key,
            "region": ask.region,
            "action": action,
            "node": best,
            "urls": urls,
            "candidates": choices,
        }))
        .into_response(),
    )
}

/// A 307 to `path` on the best node for the ask (307 keeps the method and body, so a
/// WHIP/WHEP POST with its SDP offer follows it).
fn redirect(s: &AppState, ask: &RouteAsk, path: &str) -> Response {
    match ask.choices(s).first() {
        Some(best) => with_cors(
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, format!("{}{path}", best.http_url))],
            )
                .into_response(),
        ),
        None => with_cors(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no node can take this client now".into(),
        )),
    }
}

/// `path` with the client's query (its token, say) carried over to where it is sent, less
/// the `region` that was only for this redirect.
fn with_query(path: String, query: Option<&str>) -> String {
    let Some(q) = query.filter(|q| !q.is_empty()) else {
        return path;
    };
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some("region"))
        .collect();
    if kept.is_empty() {
        path
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// A 307 for `ns/name` to `path` on the best node for `action`.
fn route_to(
    s: &AppState,
    (namespace, name): (&str, &str),
    headers: &HeaderMap,
    region: Option<String>,
    action: Action,
    path: String,
) -> Response {
    match StreamKey::new(namespace, name) {
        Ok(key) => redirect(s, &RouteAsk::new(s, key, region, headers, action), &path),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// `GET /route/{ns}/{name}.flv[?region=]`: 307 to the best edge's HTTP-FLV URL.
async fn route_flv(
    State(s): State<AppState>,
    Path((namespace, file)): Path<(String, String)>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<RouteQuery>,
    RawQuery(raw): RawQuery,
) -> Response {
    let Some(name) = file.strip_suffix(".flv") else {
        return error(StatusCode::NOT_FOUND, "expected {name}.flv".into());
    };
    let path = with_query(format!("/{namespace}/{name}.flv"), raw.as_deref());
    route_to(
        &s,
        (&namespace, name),
        &headers,
        q.region,
        Action::Play,
        path,
    )
}

/// `POST /route/whep/{ns}/{name}[?region=]`: 307 to the best edge's WHEP endpoint.
async fn route_whep(
    State(s): State<AppState>,
    Path((namespace, stream)): Path<(String, String)>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<RouteQuery>,
    RawQuery(raw): RawQuery,
) -> Response {
    let path = with_query(format!("/whep/{namespace}/{stream}"), raw.as_deref());
    route_to(
        &s,
        (&namespace, &stream),
        &headers,
        q.region,
        Action::Play,
        path,
    )
}

/// `POST /route/whip/{ns}/{name}[?region=]`: 307 to the best origin's WHIP endpoint.
async fn route_whip(
    State(s): State<AppState>,
    Path((namespace, stream)): Path<(String, String)>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<RouteQuery>,
    RawQuery(raw): RawQuery,
) -> Response {
    let path = with_query(format!("/whip/{namespace}/{stream}"), raw.as_deref());
    route_to(
        &s,
        (&namespace, &stream),
        &headers,
        q.region,
        Action::Publish,
        path,
    )
}

async fn egress_list(State(s): State<AppState>) -> impl IntoResponse {
    Json(serde_json::json!({ "egress": s.egress.list() }))
}

/// `POST /api/v1/egress` with `{stream, kind, url | format, template, ...}`: 201 with the
/// new egress (and its `Location`), or 400 listing every invalid field.
async fn egress_create(
    State(s): State<AppState>,
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

async fn egress_get(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match s.egress.get(&id) {
        Some(status) => Json(status).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no egress {id}")),
    }
}

/// Stops the egress (its file finished, its publish ended) and returns its final status.
async fn egress_delete(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match s.egress.stop(&id).await {
        Some(status) => Json(status).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no egress {id}")),
    }
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], msg + "\n").into_response()
}

async fn flv(
    State(s): State<AppState>,
    Path((namespace, file)): Path<(String, String)>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let Some(name) = file.strip_suffix(".flv") else {
        return error(StatusCode::NOT_FOUND, "not found".into());
    };
    let key = match StreamKey::new(&namespace, name) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Err(r) = authorize(
        &s,
        AuthAction::Play,
        "flv",
        &key,
        peer,
        &headers,
        query.as_deref(),
    )
    .await
    {
        return r;
    }
    s.hub.metrics().count_connection(Proto::Flv);
    let ticket = match admit(&s, "flv", &key, peer) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let mut sub = match crate::bridge::subscribe_with_audio(&s.hub, &key, Codec::Aac).await {
        Ok(sub) => sub,
        Err(e) => return subscribe_failed(e),
    };
    sub.hold(ticket);
    if let Some(why) = crate::bridge::flv_incompatible_video(&sub) {
        return error(StatusCode::NOT_ACCEPTABLE, why);
    }
    let span = tracing::info_span!("flv", stream = %key);
    span.in_scope(|| info!("playing {key} over HTTP-FLV"));
    s.auth.notify(EventKind::Play, "flv", &key, peer);
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

/// CORS headers every WHIP/WHEP response carries (browsers call these from other origins).
fn cors(headers: &mut HeaderMap) {
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, PATCH, DELETE, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type, Authorization, If-Match"),
    );
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location, Link, ETag"),
    );
}

fn with_cors(mut r: Response) -> Response {
    cors(r.headers_mut());
    r
}

/// `Link` headers announcing the configured ICE servers (RFC 9725 §4.6).
fn ice_server_links(webrtc: &crate::webrtc::WebRtc, headers: &mut HeaderMap) {
    for url in webrtc.ice_servers() {
        if let Ok(v) = HeaderValue::from_str(&format!("<{url}>; rel=\"ice-server\"")) {
            headers.append(header::LINK, v);
        }
    }
}

async fn preflight(State(s): State<AppState>) -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    cors(r.headers_mut());
    r.headers_mut()
        .insert("accept-post", HeaderValue::from_static("application/sdp"));
    if let Some(w) = &s.webrtc {
        ice_server_links(w, r.headers_mut());
    }
    r
}

/// The WebRTC server and the stream named, if this node has one, the request carries an
/// SDP offer and the name is valid.
fn webrtc_for_offer(
    s: &AppState,
    headers: &HeaderMap,
    namespace: &str,
    stream: &str,
) -> Result<(Arc<crate::webrtc::WebRtc>, StreamKey), Box<Response>> {
    let Some(webrtc) = s.webrtc.clone() else {
        return Err(Box::new(with_cors(error(
            StatusCode::NOT_FOUND,
            "WebRTC is disabled on this node".into(),
        ))));
    };
    if !is_sdp(headers) {
        return Err(Box::new(with_cors(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/sdp".into(),
        ))));
    }
    match StreamKey::new(namespace, stream) {
        Ok(key) => Ok((webrtc, key)),
        Err(e) => Err(Box::new(with_cors(error(
            StatusCode::BAD_REQUEST,
            e.to_string(),
        )))),
    }
}

/// 404 for a stream that is not live, 504 when upstream did not deliver it in time.
fn subscribe_failed(e: SubscribeError) -> Response {
    let status = match e {
        SubscribeError::NotFound(_) => StatusCode::NOT_FOUND,
        SubscribeError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
    };
    error(status, e.to_string())
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

fn is_sdp(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("application/sdp"))
}

async fn whep_post(
    State(s): State<AppState>,
    Path((namespace, stream)): Path<(String, String)>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: String,
) -> Response {
    let (webrtc, key) = match webrtc_for_offer(&s, &headers, &namespace, &stream) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    if let Err(r) = authorize(
        &s,
        AuthAction::Play,
        "whep",
        &key,
        peer,
        &headers,
        query.as_deref(),
    )
    .await
    {
        return with_cors(r);
    }
    let ticket = match admit(&s, "whep", &key, peer) {
        Ok(t) => t,
        Err(r) => return with_cors(*r),
    };
    let mut sub = match crate::bridge::subscribe_with_audio(&s.hub, &key, Codec::Opus).await {
        Ok(sub) => sub,
        Err(e) => return with_cors(subscribe_failed(e)),
    };
    sub.hold(ticket);
    let created = webrtc
        .create_whep(key.clone(), &body, sub, s.hub.clone())
        .await;
    if created.is_ok() {
        s.auth.notify(EventKind::Play, "whep", &key, peer);
    }
    session_created(&webrtc, "whep", &namespace, &stream, created)
}

async fn whip_post(
    State(s): State<AppState>,
    Path((namespace, stream)): Path<(String, String)>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: String,
) -> Response {
    if s.node.role == "edge" && is_sdp(&headers) {
        // Edges take no WebRTC publishers (whether or not they run WebRTC themselves): send
        // it to the best origin (307 keeps the offer).
        if let Ok(key) = StreamKey::new(&namespace, &stream) {
            let ask = RouteAsk::new(&s, key, None, &headers, Action::Publish);
            let path = with_query(format!("/whip/{namespace}/{stream}"), query.as_deref());
            return redirect(&s, &ask, &path);
        }
    }
    let (webrtc, key) = match webrtc_for_offer(&s, &headers, &namespace, &stream) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    if let Err(r) = authorize(
        &s,
        AuthAction::Publish,
        "whip",
        &key,
        peer,
        &headers,
        query.as_deref(),
    )
    .await
    {
        return with_cors(r);
    }
    let publisher = match s.hub.publish_checked(key.clone()).await {
        Ok(p) => p,
        Err(e @ crate::hub::PublishError::Limit(_)) => {
            s.hub.metrics().count_refused("whip", "limit");
            return with_cors(denied(Denied {
                status: 503,
                reason: e.to_string(),
            }));
        }
        Err(e) => return with_cors(error(StatusCode::CONFLICT, e.to_string())),
    };
    let created = webrtc.create_whip(key.clone(), &body, publisher);
    if created.is_ok() && s.auth.has_events() {
        s.auth.notify(EventKind::Publish, "whip", &key, peer);
        // The stream's end is the WHIP publish's end.
        let (mut events, auth) = (s.hub.events(), s.auth.clone());
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(crate::hub::HubEvent::Unpublished(k)) if k == key => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    _ => {}
                }
            }
            auth.notify(EventKind::Unpublish, "whip", &key, peer);
        });
    }
    session_created(&webrtc, "whip", &namespace, &stream, created)
}

/// The 201 answer to a WHIP/WHEP POST, or the error.
fn session_created(
    webrtc: &crate::webrtc::WebRtc,
    kind: &str,
    namespace: &str,
    stream: &str,
    created: Result<crate::webrtc::Created, crate::webrtc::WebRtcError>,
) -> Response {
    match created {
        Ok(created) => {
            info!(stream = %format!("{namespace}/{stream}"), session = %created.id, "{} session created", kind.to_uppercase());
            let location = format!("/{kind}/{namespace}/{stream}/{}", created.id);
            let mut r = (StatusCode::CREATED, created.answer).into_response();
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/sdp"),
            );
            if let Ok(v) = HeaderValue::from_str(&location) {
                h.insert(header::LOCATION, v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", created.id)) {
                h.insert(header::ETAG, v);
            }
            ice_server_links(webrtc, h);
            cors(h);
            r
        }
        Err(e @ crate::webrtc::WebRtcError::MissingCodec(_)) => {
            with_cors(error(StatusCode::NOT_ACCEPTABLE, e.to_string()))
        }
        Err(e @ crate::webrtc::WebRtcError::TooManySessions(_)) => with_cors(denied(Denied {
            status: 503,
            reason: e.to_string(),
        })),
        Err(e) => with_cors(error(StatusCode::BAD_REQUEST, e.to_string())),
    }
}

async fn session_delete(
    State(s): State<AppState>,
    Path((namespace, stream, session)): Path<(String, String, String)>,
) -> Response {
    let found = StreamKey::new(&namespace, &stream)
        .ok()
        .zip(s.webrtc.as_ref())
        .is_some_and(|(key, w)| w.delete(&key, &session));
    with_cors(if found {
        StatusCode::OK.into_response()
    } else {
        error(StatusCode::NOT_FOUND, "no such session".into())
    })
}

/// Trickle ICE and ICE restarts. The server is ICE-lite with all its candidates in the
/// answer, so client candidates are not needed (it learns the client's address from its
/// checks): fragments are accepted and ignored.
async fn session_patch(
    State(s): State<AppState>,
    Path((namespace, stream, session)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let exists = StreamKey::new(&namespace, &stream)
        .ok()
        .zip(s.webrtc.as_ref())
        .is_some_and(|(key, w)| w.session_exists(&key, &session));
    if !exists {
        return with_cors(error(StatusCode::NOT_FOUND, "no such session".into()));
    }
    let fragment = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/trickle-ice-sdpfrag"));
    with_cors(if fragment {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/trickle-ice-sdpfrag".into(),
        )
    })
}
