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
use crate::auth::{Action as AuthAction, AdminScope, Denied};
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
    let token = request_token(headers, req.uri().query());
    // With node keys every call needs a token; a namespace's admin token is honoured
    // whenever some namespace has keys; with neither, loopback clients are the node's admin.
    let scope = if s.auth.has_node_keys() || (s.auth.has_keys() && token.is_some()) {
        match s.auth.check_admin(token.as_deref()) {
            Ok(scope) => scope,
            Err(d) => {
                s.hub.metrics().count_refused("api", "denied");
                return denied(d);
            }
        }
    } else if peer.ip().to_canonical().is_loopback() {
        AdminScope::Node
    } else {
        s.hub.metrics().count_refused("api", "not_loopback");
        return denied(Denied {
            status: 403,
            reason: "the admin API answers loopback clients only: configure [auth] secrets to use it from elsewhere".into(),
        });
    };
    let mut req = req;
    req.extensions_mut().insert(scope);
    next.run(req).await
}

/// In front of what only a node-wide admin may do (the cluster's links, a reload): a
/// namespace's admin token is refused.
pub(super) async fn node_admin_only(
    axum::Extension(scope): axum::Extension<AdminScope>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match scope {
        AdminScope::Node => next.run(req).await,
        AdminScope::Namespace(ns) => denied(Denied {
            status: 403,
            reason: format!("an admin token of namespace {ns} does not reach this (it needs a node admin token)"),
        }),
    }
}

/// In front of the rooms API: rooms live in the `room` namespace.
pub(super) async fn rooms_admin_only(
    axum::Extension(scope): axum::Extension<AdminScope>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match out_of_scope(&scope, crate::media::ROOM_NAMESPACE) {
        None => next.run(req).await,
        Some(r) => r,
    }
}

/// `None` when `scope` reaches streams of `namespace`, else a 403 saying so.
pub(super) fn out_of_scope(scope: &AdminScope, namespace: &str) -> Option<Response> {
    if scope.covers(namespace) {
        return None;
    }
    Some(denied(Denied {
        status: 403,
        reason: format!("this admin token does not reach namespace {namespace}"),
    }))
}

/// The namespace of an `ns/name` string as the API lists streams.
pub(super) fn namespace_of(stream: &str) -> &str {
    stream.split_once('/').map_or(stream, |(ns, _)| ns)
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
