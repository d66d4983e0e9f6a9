//! HTTP-FLV playback: `GET /{ns}/{stream}.flv` after auth and viewer admission; the body
//! is `play::flv`'s.

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use tracing::{info, Instrument};

use super::access::{admit, authorize};
use super::http::{error, subscribe_failed, AppState};
use crate::auth::hooks::EventKind;
use crate::auth::Action as AuthAction;
use crate::media::{Codec, StreamKey};
use crate::metrics::Proto;

pub(super) async fn flv(
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
