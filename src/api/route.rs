//! Where a client should go (`GET /api/v1/route`) and the 307s to it (`/route/...`). The
//! decision is `cluster::route`'s; this file turns HTTP into an ask and a choice into URLs.

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::http::{error, AppState};
use super::webrtc::with_cors;
use crate::media::StreamKey;

#[derive(serde::Deserialize)]
pub(super) struct RouteQuery {
    stream: Option<String>,
    region: Option<String>,
    action: Option<String>,
}

/// Where a client should go: `ns/name`, its region, play or publish.
pub(super) struct RouteAsk {
    key: StreamKey,
    region: String,
    action: Action,
}

use crate::cluster::route::{Action, Choice};

impl RouteAsk {
    /// The client's region: `?region=`, else `X-Meshcast-Region`, else this node's. A
    /// region no node is in counts as this node's.
    pub(super) fn new(
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
pub(super) async fn route(
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
pub(super) fn redirect(s: &AppState, ask: &RouteAsk, path: &str) -> Response {
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
pub(super) fn with_query(path: String, query: Option<&str>) -> String {
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
pub(super) fn route_to(
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
pub(super) async fn route_flv(
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

/// `POST /route/whep/{ns}/{name}[?region=]` and `POST /route/whip/...` (`PUBLISH`): a 307
/// to the best edge's WHEP endpoint, or the best origin's WHIP endpoint.
pub(super) async fn route_webrtc<const PUBLISH: bool>(
    State(s): State<AppState>,
    Path((namespace, stream)): Path<(String, String)>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<RouteQuery>,
    RawQuery(raw): RawQuery,
) -> Response {
    let (kind, action) = match PUBLISH {
        true => ("whip", Action::Publish),
        false => ("whep", Action::Play),
    };
    let path = with_query(format!("/{kind}/{namespace}/{stream}"), raw.as_deref());
    route_to(&s, (&namespace, &stream), &headers, q.region, action, path)
}
