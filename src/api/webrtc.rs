//! WHIP and WHEP signalling over HTTP: the offer POST (auth, admission, the answer),
//! PATCH (trickle ICE) and DELETE of a session, CORS and the ICE servers in `Link`
//! headers. The peers themselves are `webrtc`'s.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::info;

use super::access::{admit, authorize, denied};
use super::http::{error, subscribe_failed, AppState};
use super::route::{redirect, with_query, RouteAsk};
use crate::auth::hooks::EventKind;
use crate::auth::{Action as AuthAction, Denied};
use crate::bridge::WebRtcSubscribeError;
use crate::cluster::route::Action;
use crate::media::StreamKey;

/// CORS headers every WHIP/WHEP response carries (browsers call these from other origins).
pub(super) fn cors(headers: &mut HeaderMap) {
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

pub(super) fn with_cors(mut r: Response) -> Response {
    cors(r.headers_mut());
    r
}

/// `Link` headers announcing the configured ICE servers (RFC 9725 §4.6).
pub(super) fn ice_server_links(webrtc: &crate::webrtc::WebRtc, headers: &mut HeaderMap) {
    for url in webrtc.ice_servers() {
        if let Ok(v) = HeaderValue::from_str(&format!("<{url}>; rel=\"ice-server\"")) {
            headers.append(header::LINK, v);
        }
    }
}

pub(super) async fn preflight(State(s): State<AppState>) -> Response {
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

/// An offer this client may make: [`webrtc_for_offer`], then [`authorize`] for `action`
/// (publish: WHIP, play: WHEP). Every refusal carries the CORS headers.
async fn offer_allowed(
    s: &AppState,
    headers: &HeaderMap,
    (namespace, stream): (&str, &str),
    peer: SocketAddr,
    query: Option<&str>,
    action: AuthAction,
) -> Result<(Arc<crate::webrtc::WebRtc>, StreamKey), Response> {
    let protocol = match action {
        AuthAction::Publish => "whip",
        _ => "whep",
    };
    let (webrtc, key) = webrtc_for_offer(s, headers, namespace, stream).map_err(|r| *r)?;
    authorize(s, action, protocol, &key, peer, headers, query)
        .await
        .map_err(with_cors)?;
    Ok((webrtc, key))
}

pub(super) fn is_sdp(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("application/sdp"))
}

pub(super) async fn whep_post(
    State(s): State<AppState>,
    Path((namespace, stream)): Path<(String, String)>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: String,
) -> Response {
    let (webrtc, key) = match offer_allowed(
        &s,
        &headers,
        (&namespace, &stream),
        peer,
        query.as_deref(),
        AuthAction::Play,
    )
    .await
    {
        Ok(x) => x,
        Err(r) => return r,
    };
    let ticket = match admit(&s, "whep", &key, peer) {
        Ok(t) => t,
        Err(r) => return with_cors(*r),
    };
    let mut sub = match crate::bridge::subscribe_for_webrtc(&s.hub, &key, webrtc.bframes()).await {
        Ok(sub) => sub,
        Err(WebRtcSubscribeError::Subscribe(e)) => return with_cors(subscribe_failed(e)),
        Err(e @ WebRtcSubscribeError::Bframes) => {
            s.hub.metrics().count_refused("whep", "bframes");
            return with_cors(error(StatusCode::NOT_ACCEPTABLE, e.to_string()));
        }
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

pub(super) async fn whip_post(
    State(s): State<AppState>,
    Path((namespace, stream)): Path<(String, String)>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: String,
) -> Response {
    if !crate::cluster::route::takes_webrtc_publishers(s.node.role) && is_sdp(&headers) {
        // Sent to the best origin (307 keeps the offer), whether or not this node runs
        // WebRTC itself.
        if let Ok(key) = StreamKey::new(&namespace, &stream) {
            let ask = RouteAsk::new(&s, key, None, &headers, Action::Publish);
            let path = with_query(format!("/whip/{namespace}/{stream}"), query.as_deref());
            return redirect(&s, &ask, &path);
        }
    }
    let (webrtc, key) = match offer_allowed(
        &s,
        &headers,
        (&namespace, &stream),
        peer,
        query.as_deref(),
        AuthAction::Publish,
    )
    .await
    {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Some((room, _)) = crate::auth::room_stream(&key) {
        if s.rooms.info(room).is_none() {
            return error(StatusCode::NOT_FOUND, format!("no room {room}"));
        }
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
pub(super) fn session_created(
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

pub(super) async fn session_delete(
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
pub(super) async fn session_patch(
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
