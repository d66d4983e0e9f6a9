//! Who may publish, play and administer: signed tokens, the auth webhook, and the event
//! hook.
//!
//! [`Auth`] is the one place a node decides. Ingest and playback (RTMP, HTTP-FLV, WHIP,
//! WHEP) ask [`Auth::check`] before a publish or play; the HTTP API asks
//! [`Auth::check_admin`]. With no `[auth]` section everything is allowed here (the HTTP API
//! then answers admin calls from loopback only, see `api::http`). With `[auth]`, a token is
//! required when keys are configured, and the webhook (if any) must answer 2xx as well.
//!
//! Tokens are secrets: they are never logged, never put in metrics or API answers. Callers
//! pass the token separately from the stream name, which never carries a query.

pub mod hooks;
pub mod token;
pub mod webhook;

use std::net::SocketAddr;

pub use token::{Action, Claims, Keys, TokenError};

use crate::media::StreamKey;

pub use crate::config::AuthConfig;

/// Where a request came from and what it asks for.
#[derive(Clone, Debug)]
pub struct Access<'a> {
    pub action: Action,
    /// `rtmp`, `flv`, `whip`, `whep`.
    pub protocol: &'static str,
    pub stream: &'a StreamKey,
    pub client: SocketAddr,
    /// The query the client sent (for the webhook), token included.
    pub query: &'a str,
    pub token: Option<&'a str>,
}

/// A refusal: the HTTP status that fits and a sentence for the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Denied {
    pub status: u16,
    pub reason: String,
}

impl Denied {
    fn unauthorized(reason: impl Into<String>) -> Denied {
        Denied {
            status: 401,
            reason: reason.into(),
        }
    }

    fn forbidden(reason: impl Into<String>) -> Denied {
        Denied {
            status: 403,
            reason: reason.into(),
        }
    }
}

/// The node's access decisions (see the module doc).
pub struct Auth {
    on: bool,
    keys: Option<Keys>,
    webhook: Option<webhook::AuthWebhook>,
    metrics_token: Option<String>,
    node_id: String,
    events: Option<hooks::EventHook>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys and tokens stay out of debug output.
        f.debug_struct("Auth")
            .field("on", &self.on)
            .field("keys", &self.keys)
            .field("webhook", &self.webhook.is_some())
            .field("events", &self.events.is_some())
            .finish()
    }
}

impl Auth {
    /// No `[auth]`: everything is allowed (the API limits itself to loopback).
    pub fn open(node_id: &str) -> Auth {
        Auth {
            on: false,
            keys: None,
            webhook: None,
            metrics_token: None,
            node_id: node_id.to_string(),
            events: None,
        }
    }

    /// Sends publish/play notifications to `hook` from now on.
    pub fn with_events(mut self, hook: Option<hooks::EventHook>) -> Auth {
        self.events = hook;
        self
    }

    /// Whether an event hook is configured.
    pub fn has_events(&self) -> bool {
        self.events.is_some()
    }

    /// Queues an event for the event hook, if one is configured (never waits).
    pub fn notify(
        &self,
        kind: hooks::EventKind,
        protocol: &str,
        stream: &StreamKey,
        client: SocketAddr,
    ) {
        if let Some(h) = &self.events {
            h.notify(kind, protocol, stream, client);
        }
    }

    pub fn new(config: &AuthConfig, node_id: &str) -> Result<Auth, String> {
        let keys = if config.secrets.is_empty() && config.public_keys.is_empty() {
            None
        } else {
            Some(Keys::new(&config.secrets, &config.public_keys)?)
        };
        let webhook = match &config.webhook {
            Some(url) => Some(webhook::AuthWebhook::new(
                url,
                config.webhook_timeout,
                config.webhook_cache,
            )?),
            None => None,
        };
        Ok(Auth {
            on: config.is_on(),
            keys,
            webhook,
            metrics_token: config.metrics_token.clone(),
            node_id: node_id.to_string(),
            events: None,
        })
    }

    /// Whether `[auth]` is configured.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Whether admin tokens can be checked (keys are configured).
    pub fn has_keys(&self) -> bool {
        self.keys.is_some()
    }

    pub fn keys(&self) -> Option<&Keys> {
        self.keys.as_ref()
    }

    /// Decides a publish or play: the token (when keys are configured), then the webhook
    /// (when one is configured).
    pub async fn check(&self, access: &Access<'_>) -> Result<(), Denied> {
        if let Some(keys) = &self.keys {
            let stream = access.stream.to_string();
            let token = access.token.filter(|t| !t.is_empty()).ok_or_else(|| {
                Denied::unauthorized(format!(
                    "a token is required to {} {stream} (?token= or Authorization: Bearer)",
                    access.action.as_str()
                ))
            })?;
            let claims = keys
                .verify(token)
                .map_err(|e| Denied::unauthorized(e.to_string()))?;
            if let Some((room, identity)) = room_stream(access.stream) {
                check_room_access(&claims, access.action, room, identity)?;
            } else if !claims.allows(access.action) {
                return Err(Denied::forbidden(format!(
                    "token does not allow {}",
                    access.action.as_str()
                )));
            } else if !claims.covers(&stream) {
                return Err(Denied::forbidden(format!("token does not cover {stream}")));
            }
        }
        if let Some(hook) = &self.webhook {
            hook.ask(access, &self.node_id).await?;
        }
        Ok(())
    }

    /// Decides who joins room `room`. With keys, a join token for that room is required
    /// and its `sub` is the participant's identity (`name` its display name): returned as
    /// `Some`. Without keys (auth off, or a webhook only) `None`: the caller takes the
    /// identity the client gives.
    pub fn check_join(
        &self,
        token: Option<&str>,
        room: &str,
    ) -> Result<Option<(String, Option<String>)>, Denied> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
            Denied::unauthorized(
                "joining a room needs its join token (?access_token= or Authorization: Bearer)",
            )
        })?;
        let claims = keys
            .verify(token)
            .map_err(|e| Denied::unauthorized(e.to_string()))?;
        if !claims.allows(Action::Join) {
            return Err(Denied::forbidden("token does not allow join"));
        }
        if claims.room.as_deref() != Some(room) {
            return Err(Denied::forbidden("the token is for another room"));
        }
        let identity = claims
            .sub
            .ok_or_else(|| Denied::forbidden("a join token must name its participant (sub)"))?;
        Ok(Some((identity, claims.name)))
    }

    /// Decides an admin API call: `Ok` with auth off is the caller's business (loopback).
    pub fn check_admin(&self, token: Option<&str>) -> Result<(), Denied> {
        let Some(keys) = &self.keys else {
            return Err(Denied::forbidden(
                "admin calls need [auth] secrets or public_keys on this node",
            ));
        };
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Denied::unauthorized("an admin token is required"))?;
        let claims = keys
            .verify(token)
            .map_err(|e| Denied::unauthorized(e.to_string()))?;
        if !claims.allows(Action::Admin) {
            return Err(Denied::forbidden("token does not allow admin"));
        }
        Ok(())
    }

    /// Decides a `/metrics` scrape.
    pub fn check_metrics(&self, token: Option<&str>) -> Result<(), Denied> {
        match &self.metrics_token {
            None => Ok(()),
            Some(want) => match token {
                Some(t) if constant_time_eq(t.as_bytes(), want.as_bytes()) => Ok(()),
                Some(_) => Err(Denied::unauthorized("wrong metrics token")),
                None => Err(Denied::unauthorized("/metrics needs its bearer token")),
            },
        }
    }
}

pub use crate::media::ROOM_NAMESPACE;

/// The room and the participant's identity a room stream belongs to (`room/ROOM.IDENTITY`,
/// a layer or rendition of it included; the room's mix `room/ROOM~mix.LAYOUT` has the
/// identity ""); `None` for any other stream.
pub fn room_stream(key: &StreamKey) -> Option<(&str, &str)> {
    if key.namespace() != ROOM_NAMESPACE {
        return None;
    }
    let name = key.name();
    let name = name.split_once('~').map_or(name, |(base, _)| base);
    Some(name.split_once('.').unwrap_or((name, "")))
}

/// What a token may do with a room's streams: an admin token anything; a `join` token for
/// that room may play every participant's stream and publish its own (its `sub`). No other
/// token reaches a room's streams, whatever its stream patterns say.
fn check_room_access(
    claims: &Claims,
    action: Action,
    room: &str,
    identity: &str,
) -> Result<(), Denied> {
    if claims.allows(Action::Admin) {
        return Ok(());
    }
    if !claims.allows(Action::Join) {
        return Err(Denied::forbidden(format!(
            "streams of room {room} need a join token for that room"
        )));
    }
    if claims.room.as_deref() != Some(room) {
        return Err(Denied::forbidden("the token is for another room"));
    }
    match action {
        Action::Play => Ok(()),
        Action::Publish if claims.sub.as_deref() == Some(identity) => Ok(()),
        Action::Publish => Err(Denied::forbidden(format!(
            "a participant publishes only its own stream: room/{room}.{}",
            claims.sub.as_deref().unwrap_or("(the token has no sub)")
        ))),
        _ => Err(Denied::forbidden(format!(
            "token does not allow {}",
            action.as_str()
        ))),
    }
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `token` parameter of a query string (`a=1&token=T`), percent-decoded.
pub fn token_from_query(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

/// Splits an RTMP stream key `name?query` into the name and the query.
pub fn split_query(key: &str) -> (&str, &str) {
    match key.split_once('?') {
        Some((name, query)) => (name, query),
        None => (key, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let config = AuthConfig {
            secrets: vec!["a-secret-of-some-length".into()],
            ..Default::default()
        };
        Auth::new(&config, "n1").unwrap()
    }

    fn token(a: &Auth, act: Action, streams: &[&str]) -> String {
        a.keys()
            .unwrap()
            .mint(&Claims {
                act: token::OneOrMany::One(act),
                streams: streams.iter().map(|s| s.to_string()).collect(),
                exp: token::now_s() + 60,
                nbf: None,
                iat: None,
                sub: None,
                room: None,
                name: None,
            })
            .unwrap()
    }

    fn access<'a>(action: Action, stream: &'a StreamKey, t: Option<&'a str>) -> Access<'a> {
        Access {
            action,
            protocol: "rtmp",
            stream,
            client: "127.0.0.1:5000".parse().unwrap(),
            query: "",
            token: t,
        }
    }

    #[tokio::test]
    async fn a_token_allows_only_its_action_and_streams() {
        let a = auth();
        let key = StreamKey::new("live", "demo").unwrap();
        let publish = token(&a, Action::Publish, &["live/*"]);
        a.check(&access(Action::Publish, &key, Some(&publish)))
            .await
            .unwrap();
        let e = a
            .check(&access(Action::Play, &key, Some(&publish)))
            .await
            .unwrap_err();
        assert_eq!(
            (e.status, e.reason.as_str()),
            (403, "token does not allow play")
        );
        let other = token(&a, Action::Publish, &["vod/*"]);
        let e = a
            .check(&access(Action::Publish, &key, Some(&other)))
            .await
            .unwrap_err();
        assert_eq!(e.status, 403);
        assert!(e.reason.contains("live/demo"), "{e}");
        let e = a
            .check(&access(Action::Publish, &key, None))
            .await
            .unwrap_err();
        assert_eq!(e.status, 401);
        // Publish tokens are not admin tokens.
        assert_eq!(a.check_admin(Some(&publish)).unwrap_err().status, 403);
        a.check_admin(Some(&token(&a, Action::Admin, &[]))).unwrap();
    }

    #[tokio::test]
    async fn auth_off_allows_everything_but_admin() {
        let a = Auth::open("n1");
        let key = StreamKey::new("live", "demo").unwrap();
        a.check(&access(Action::Publish, &key, None)).await.unwrap();
        assert!(a.check_admin(Some("x")).is_err());
        assert!(!a.is_on());
    }

    #[test]
    fn queries_give_their_token() {
        assert_eq!(split_query("demo?token=abc&x=1"), ("demo", "token=abc&x=1"));
        assert_eq!(split_query("demo"), ("demo", ""));
        assert_eq!(token_from_query("x=1&token=a%2Eb").as_deref(), Some("a.b"));
        assert_eq!(token_from_query("x=1"), None);
    }
}
