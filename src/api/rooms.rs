//! Rooms over HTTP: the admin routes (create, list, show, close, mint a join token) and
//! each participant's event channel, a WebSocket at `/api/v1/rooms/{id}/events`.
//!
//! The event channel is the participant's presence: it joins when the socket opens (a join
//! token for the room, `?token=` since browsers cannot set headers on a WebSocket; with no
//! token keys, `?identity=&name=`) and leaves when it closes or goes silent (a ping every
//! second; nothing heard for [`SILENT_AFTER`] means the network is gone). What a client may
//! send is small JSON text frames, each bounded in size and rate; anything else is refused
//! with a reason, and a client refused [`MAX_REFUSALS`] times in a row is disconnected.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::SinkExt;
use serde::Deserialize;

use super::access::{denied, request_token};
use super::http::{is_json, AppState};
use crate::rooms::checks::ClientMessage;
use crate::rooms::state::{valid_identity, valid_room_id, RateLimit};
use crate::rooms::{close, Membership, Outgoing, RoomError};

/// The event channel pings this often.
const PING_EVERY: Duration = Duration::from_secs(1);
/// A participant heard from (any frame, pongs included) less recently than this is gone.
pub const SILENT_AFTER: Duration = Duration::from_secs(4);
/// A write to a participant that does not complete within this is a lost participant.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Events sent in one write at most.
const WRITE_BATCH: usize = 64;
/// Refused messages in a row before the channel is closed.
const MAX_REFUSALS: u32 = 50;
/// A frame larger than this closes the channel (1009); smaller data messages over the
/// configured `max_message_bytes` are refused with a reason and the channel stays.
const MAX_FRAME_BYTES: usize = 1 << 20;

fn json_error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

fn room_error(e: RoomError) -> Response {
    let status = match e {
        RoomError::NoRoom(_) => StatusCode::NOT_FOUND,
        RoomError::Full(..) | RoomError::TooManyRooms(_) => StatusCode::SERVICE_UNAVAILABLE,
        RoomError::Invalid(_) => StatusCode::BAD_REQUEST,
    };
    json_error(status, e.to_string())
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRoom {
    name: Option<String>,
    max_participants: Option<u32>,
    empty_timeout_s: Option<u64>,
}

/// Where a participant of `room` connects, relative to a node's HTTP base.
fn join_urls(room: &str) -> serde_json::Value {
    serde_json::json!({
        "events": format!("/api/v1/rooms/{room}/events"),
        "whip": format!("/whip/room/{room}.{{identity}}"),
        "whep": format!("/whep/room/{room}.{{identity}}"),
        "route": format!("/api/v1/route?stream=room/{room}.{{identity}}"),
    })
}

/// `POST /api/v1/rooms` (admin): the body is optional.
pub(super) async fn room_create(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let req: CreateRoom = if body.is_empty() {
        CreateRoom::default()
    } else if !is_json(&headers) {
        return json_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        );
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
        }
    };
    match s.rooms.create(
        req.name.as_deref(),
        req.max_participants,
        req.empty_timeout_s,
    ) {
        Ok(info) => {
            let location = format!("/api/v1/rooms/{}", info.id);
            let mut v = serde_json::to_value(&info).unwrap_or_default();
            v["join"] = join_urls(&info.id);
            (StatusCode::CREATED, [(header::LOCATION, location)], Json(v)).into_response()
        }
        Err(e) => room_error(e),
    }
}

/// `GET /api/v1/rooms` (admin).
pub(super) async fn room_list(State(s): State<AppState>) -> Response {
    let rooms: Vec<serde_json::Value> = s
        .rooms
        .list()
        .into_iter()
        .map(|(info, n)| {
            let mut v = serde_json::to_value(&info).unwrap_or_default();
            v["participants"] = n.into();
            v
        })
        .collect();
    Json(serde_json::json!({ "rooms": rooms })).into_response()
}

/// `GET /api/v1/rooms/{id}` (admin): the room and its participants.
pub(super) async fn room_get(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let (Some(info), Some(members)) = (s.rooms.info(&id), s.rooms.members(&id)) else {
        return room_error(RoomError::NoRoom(id));
    };
    let mut v = serde_json::to_value(&info).unwrap_or_default();
    v["participants"] = serde_json::to_value(members).unwrap_or_default();
    v["join"] = join_urls(&id);
    Json(v).into_response()
}

/// `DELETE /api/v1/rooms/{id}` (admin): everyone is disconnected, the room is gone.
pub(super) async fn room_delete(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    if s.rooms.delete(&id, "the room was closed") {
        StatusCode::NO_CONTENT.into_response()
    } else {
        room_error(RoomError::NoRoom(id))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    identity: String,
    name: Option<String>,
    ttl_s: Option<u64>,
}

/// `POST /api/v1/rooms/{id}/tokens` (admin): a join token for one participant, signed with
/// the node's first `[auth]` secret.
pub(super) async fn room_token(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !is_json(&headers) {
        return json_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        );
    }
    let req: TokenRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
    };
    if s.rooms.info(&id).is_none() {
        return room_error(RoomError::NoRoom(id));
    }
    if !valid_identity(&req.identity) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "identity must be 1-64 of A-Z a-z 0-9 _ - . (not starting with .)",
        );
    }
    let ttl = req.ttl_s.unwrap_or(3600);
    if ttl == 0 || ttl > 7 * 86_400 {
        return json_error(StatusCode::BAD_REQUEST, "ttl_s must be 1 to 604800");
    }
    let Some(keys) = s.auth.keys() else {
        return json_error(
            StatusCode::CONFLICT,
            "this node checks no tokens ([auth] has no secrets): join with ?identity=",
        );
    };
    let now = crate::auth::token::now_s();
    let claims = crate::auth::Claims {
        act: crate::auth::token::OneOrMany::One(crate::auth::Action::Join),
        streams: Vec::new(),
        exp: now + ttl,
        nbf: None,
        iat: Some(now),
        sub: Some(req.identity),
        room: Some(id),
        name: req.name,
        ns: None,
    };
    match keys.mint(&claims) {
        Ok(token) => Json(serde_json::json!({ "token": token })).into_response(),
        Err(e) => json_error(StatusCode::CONFLICT, e),
    }
}

/// `GET /api/v1/rooms/{id}/events`: the participant's event channel (see the module doc).
pub(super) async fn room_events(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Ok(ws) = ws else {
        return json_error(
            StatusCode::UPGRADE_REQUIRED,
            "the event channel is a WebSocket",
        );
    };
    if !valid_room_id(&id) || s.rooms.info(&id).is_none() {
        return room_error(RoomError::NoRoom(id));
    }
    let token = request_token(&headers, query.as_deref());
    let (identity, name) = match s.auth.check_join(token.as_deref(), &id) {
        Ok(Some((identity, name))) => (identity, name.unwrap_or_default()),
        Ok(None) => {
            let q: Vec<(String, String)> =
                form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
                    .into_owned()
                    .collect();
            let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
            match get("identity") {
                Some(identity) => (identity, get("name").unwrap_or_default()),
                None => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        "say who joins: ?identity=NAME (this node checks no tokens)",
                    )
                }
            }
        }
        Err(d) => {
            s.hub.metrics().count_refused("room", "denied");
            tracing::info!(%peer, room = %id, "room join refused: {}", d.reason);
            return denied(d);
        }
    };
    if !s.rooms.has_room_for_one_more() {
        s.hub.metrics().count_refused("room", "limit");
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node serves as many participants as it may (rooms.max_local_participants)",
        );
    }
    let membership = match s.rooms.join(&id, &identity, &name) {
        Ok(m) => m,
        Err(e) => {
            s.hub.metrics().count_refused("room", "join");
            return room_error(e);
        }
    };
    let config = s.rooms.config().clone();
    let metrics = s.hub.metrics().clone();
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move {
            let rooms = s.rooms.clone();
            serve_channel(socket, membership, &rooms, &config, &metrics).await;
        })
}

/// Runs one participant's channel until it closes, goes silent or is closed from here.
async fn serve_channel(
    mut socket: WebSocket,
    mut m: Membership,
    rooms: &crate::rooms::Rooms,
    config: &crate::config::RoomsConfig,
    metrics: &crate::metrics::Metrics,
) {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    let mut rate = RateLimit::new(config.messages_per_s, config.message_burst, heard);
    let mut refusals = 0u32;
    let mut pending_close: Option<Outgoing> = None;
    loop {
        tokio::select! {
            out = m.events.recv() => match out {
                Some(Outgoing::Text(t)) => {
                    // Whatever else is queued goes in the same write (a join storm sends
                    // every participant an event per joiner).
                    let mut batch = vec![t];
                    while batch.len() < WRITE_BATCH {
                        match m.events.try_recv() {
                            Ok(Outgoing::Text(t)) => batch.push(t),
                            Ok(close) => {
                                pending_close = Some(close);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if send_batch(&mut socket, batch).await.is_err() {
                        m.set_reason("lost");
                        return;
                    }
                    if let Some(Outgoing::Close(code, reason)) = pending_close.take() {
                        close_channel(&mut socket, &mut m, code, reason).await;
                        return;
                    }
                }
                Some(Outgoing::Close(code, reason)) => {
                    close_channel(&mut socket, &mut m, code, reason).await;
                    return;
                }
                None => {
                    m.set_reason("disconnected");
                    return;
                }
            },
            _ = ping.tick() => {
                if heard.elapsed() > SILENT_AFTER {
                    m.set_reason("lost");
                    return;
                }
                if !send_within(&mut socket, Message::Ping(Default::default())).await {
                    m.set_reason("lost");
                    return;
                }
            }
            incoming = socket.recv() => {
                let msg = match incoming {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        tracing::debug!(room = %m.room, identity = %m.identity, "event channel error: {e}");
                        m.set_reason("lost");
                        return;
                    }
                    None => return,
                };
                heard = Instant::now();
                let answer = match msg {
                    Message::Text(t) => handle_text(t.as_str(), &m, rooms, config, &mut rate, heard),
                    Message::Binary(_) => Err("binary frames are not taken: send JSON text".into()),
                    Message::Close(_) => return,
                    Message::Ping(_) | Message::Pong(_) => Ok(()),
                };
                match answer {
                    Ok(()) => refusals = 0,
                    Err(reason) => {
                        refusals += 1;
                        metrics.count_refused("room", "message");
                        let text = serde_json::json!({ "type": "error", "reason": reason }).to_string();
                        if refusals >= MAX_REFUSALS {
                            let close = Message::Close(Some(CloseFrame {
                                code: close::POLICY,
                                reason: "too many refused messages".into(),
                            }));
                            send_within(&mut socket, close).await;
                            m.set_reason("disconnected");
                            return;
                        }
                        if !send_within(&mut socket, Message::Text(text.into())).await {
                            m.set_reason("lost");
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Sends queued events in one write, within [`WRITE_TIMEOUT`].
async fn send_batch(socket: &mut WebSocket, batch: Vec<Arc<str>>) -> Result<(), ()> {
    let write = async {
        for t in batch {
            socket.feed(Message::Text(t.as_ref().into())).await?;
        }
        socket.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Sends one message within [`WRITE_TIMEOUT`]: `false` if it failed or the client stopped
/// reading (its TCP window stayed full), so a participant that never reads is dropped
/// rather than held.
async fn send_within(socket: &mut WebSocket, msg: Message) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, socket.send(msg)).await,
        Ok(Ok(()))
    )
}

/// Closes the channel from here, with the leave reason that fits `code`.
async fn close_channel(socket: &mut WebSocket, m: &mut Membership, code: u16, reason: String) {
    m.set_reason(match code {
        close::REPLACED => "rejoined",
        close::ROOM_CLOSED => "closed",
        _ => "disconnected",
    });
    let close = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    send_within(socket, close).await;
}

/// One text frame from a participant: a data message or a mute; `Err` says why not.
fn handle_text(
    text: &str,
    m: &Membership,
    rooms: &crate::rooms::Rooms,
    config: &crate::config::RoomsConfig,
    rate: &mut RateLimit,
    now: Instant,
) -> Result<(), String> {
    let msg = ClientMessage::parse(text, config, rate, now)?;
    match msg {
        ClientMessage::Data { payload, to } => rooms.send_data(m, to.as_deref(), payload),
        ClientMessage::Mute { video, muted } => {
            rooms.set_muted(m, video, muted);
            Ok(())
        }
    }
}
