//! Who may call what over HTTP: the admin middleware (an admin token with `[auth]` keys,
//! else loopback only; never a foreign web origin), the token a request carries, the auth
//! check before a publish or play, and viewer admission under the limits.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::http::AppState;
use crate::auth::hooks::EventKind;
use crate::auth::{Action as AuthAction, Denied};
use crate::media::StreamKey;

/// A refusal as HTTP: its status and a one-line JSON reason.
pub(super) fn denied(d: Denied) -> Response {
    let status = StatusCode::from_u16(d.status).unwrap_or(StatusCode::FORBIDDEN);
    let mut r = (status, Json(serde_json::json!({ "error": d.reason }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"meshcast\""),
        );
    }
    r
}

/// The request's token: `Authorization: Bearer T`, else `?token=T`.
pub(super) fn request_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string())
        .or_else(|| query.and_then(crate::auth::token_from_query))
}

/// Whether `origin` (a browser's `Origin` header) is this server (`Host`).
fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

/// In front of every admin endpoint (see the module doc).
pub(super) async fn admin_only(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = req.headers();
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        if !same_origin(origin, headers) {
            s.hub.metrics().count_refused("api", "foreign_origin");
            return denied(Denied {
                status: 403,
                reason: format!("requests from the web origin {origin} are refused"),
            });
        }
    }
    if s.auth.has_keys() {
        let token = request_token(headers, req.uri().query());
        if let Err(d) = s.auth.check_admin(token.as_deref()) {
            s.hub.metrics().count_refused("api", "denied");
            return denied(d);
        }
    } else if !peer.ip().to_canonical().is_loopback() {
        s.hub.metrics().count_refused("api", "not_loopback");
        return denied(Denied {
            status: 403,
            reason: "the admin API answers loopback clients only: configure [auth] secrets to use it from elsewhere".into(),
        });
    }
    next.run(req).await
}

/// A viewer's place under the viewer limits, or a 503 saying which limit is reached.
/// The event hook hears `play` now and `stop` when the viewer leaves.
pub(super) fn admit(
    s: &AppState,
    protocol: &'static str,
    key: &StreamKey,
    peer: SocketAddr,
) -> Result<crate::hub::ViewerTicket, Box<Response>> {
    let mut ticket = s.hub.admit_viewer(key, protocol, peer).map_err(|why| {
        s.hub.metrics().count_refused(protocol, "limit");
        Box::new(denied(Denied {
            status: 503,
            reason: why,
        }))
    })?;
    let (auth, key) = (s.auth.clone(), key.clone());
    ticket.on_release(move || auth.notify(EventKind::Stop, protocol, &key, peer));
    Ok(ticket)
}

/// Asks [`Auth`] whether this HTTP client may publish or play `key`.
pub(super) async fn authorize(
    s: &AppState,
    action: AuthAction,
    protocol: &'static str,
    key: &StreamKey,
    peer: SocketAddr,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(), Response> {
    let token = request_token(headers, query);
    let access = crate::auth::Access {
        action,
        protocol,
        stream: key,
        client: peer,
        query: query.unwrap_or(""),
        token: token.as_deref(),
    };
    s.auth.check(&access).await.map_err(|d| {
        s.hub.metrics().count_refused(protocol, "denied");
        tracing::info!(%peer, stream = %key, "{protocol} {} refused: {}", action.as_str(), d.reason);
        denied(d)
    })
}
