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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::RwLock;
pub use token::{Action, Claims, Keys, TokenError};

use crate::media::StreamKey;

pub use crate::config::AuthConfig;
use crate::config::NamespacesConfig;

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

/// Who may call the admin API: the whole node, or one namespace's streams, egress and
/// viewers (an admin token of that namespace's keys, or one claiming `ns`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminScope {
    Node,
    Namespace(String),
}

impl AdminScope {
    /// Whether this scope reaches streams of `namespace`.
    pub fn covers(&self, namespace: &str) -> bool {
        match self {
            AdminScope::Node => true,
            AdminScope::Namespace(ns) => ns == namespace,
        }
    }
}

/// What decides for one set of streams: the node's `[auth]`, or a namespace's own.
struct Gate {
    keys: Option<Arc<Keys>>,
    webhook: Option<webhook::AuthWebhook>,
}

impl Gate {
    fn new(config: &AuthConfig) -> Result<Gate, String> {
        let keys = if config.secrets.is_empty() && config.public_keys.is_empty() {
            None
        } else {
            Some(Arc::new(Keys::new(&config.secrets, &config.public_keys)?))
        };
        let webhook = match &config.webhook {
            Some(url) => Some(webhook::AuthWebhook::new(
                url,
                config.webhook_timeout,
                config.webhook_cache,
            )?),
            None => None,
        };
        Ok(Gate { keys, webhook })
    }
}

/// Everything a decision reads, replaced whole on a reload.
struct Rules {
    on: bool,
    node: Arc<Gate>,
    metrics_token: Option<String>,
    /// Namespaces with their own `auth`, by name.
    gates: HashMap<String, Arc<Gate>>,
    namespaces: Arc<NamespacesConfig>,
}

impl Rules {
    /// The gate for streams of `namespace`: its own, else the node's.
    fn gate(&self, namespace: &str) -> &Arc<Gate> {
        self.gates.get(namespace).unwrap_or(&self.node)
    }
}

/// The node's access decisions (see the module doc).
pub struct Auth {
    rules: RwLock<Arc<Rules>>,
    node_id: String,
    events: RwLock<Option<Arc<hooks::EventHook>>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys and tokens stay out of debug output.
        let r = self.rules.read();
        f.debug_struct("Auth")
            .field("on", &r.on)
            .field("keys", &r.node.keys)
            .field("webhook", &r.node.webhook.is_some())
            .field("namespace_gates", &r.gates.len())
            .field("events", &self.events.read().is_some())
            .finish()
    }
}

impl Auth {
    /// No `[auth]`: everything is allowed (the API limits itself to loopback).
    pub fn open(node_id: &str) -> Auth {
        Auth {
            rules: RwLock::new(Arc::new(Rules {
                on: false,
                node: Arc::new(Gate {
                    keys: None,
                    webhook: None,
                }),
                metrics_token: None,
                gates: HashMap::new(),
                namespaces: Arc::default(),
            })),
            node_id: node_id.to_string(),
            events: RwLock::new(None),
        }
    }

    /// Sends publish/play notifications to `hook` from now on (none: to nobody). The hook
    /// replaced ends its delivery task once its queue is drained.
    pub fn set_events(&self, hook: Option<hooks::EventHook>) {
        *self.events.write() = hook.map(Arc::new);
    }

    /// Whether an event hook is configured.
    pub fn has_events(&self) -> bool {
        self.events.read().is_some()
    }

    /// Queues an event for the event hook, if one is configured (never waits).
    pub fn notify(
        &self,
        kind: hooks::EventKind,
        protocol: &str,
        stream: &StreamKey,
        client: SocketAddr,
    ) {
        let hook = self.events.read().clone();
        if let Some(h) = hook {
            h.notify(kind, protocol, stream, client);
        }
    }

    pub fn new(config: &AuthConfig, node_id: &str) -> Result<Auth, String> {
        let auth = Auth::open(node_id);
        auth.reconfigure(config, &Arc::default())?;
        Ok(auth)
    }

    /// Replaces every key, webhook and namespace rule (at start, and on a reload); on an
    /// error the rules in force stay.
    pub fn reconfigure(
        &self,
        config: &AuthConfig,
        namespaces: &Arc<NamespacesConfig>,
    ) -> Result<(), String> {
        let mut gates = HashMap::new();
        for (name, ns) in &namespaces.declared {
            if let Some(a) = &ns.auth {
                let gate = Gate::new(a).map_err(|e| format!("namespace {name}: {e}"))?;
                gates.insert(name.clone(), Arc::new(gate));
            }
        }
        let rules = Rules {
            on: config.is_on(),
            node: Arc::new(Gate::new(config)?),
            metrics_token: config.metrics_token.clone(),
            gates,
            namespaces: namespaces.clone(),
        };
        *self.rules.write() = Arc::new(rules);
        Ok(())
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.read().clone()
    }

    /// Whether `[auth]` is configured.
    pub fn is_on(&self) -> bool {
        self.rules.read().on
    }

    /// Whether admin tokens can be checked (the node or a namespace has keys).
    pub fn has_keys(&self) -> bool {
        let r = self.rules.read();
        r.node.keys.is_some() || r.gates.values().any(|g| g.keys.is_some())
    }

    /// Whether the node's own `[auth]` has keys (then every admin call needs a token).
    pub fn has_node_keys(&self) -> bool {
        self.rules.read().node.keys.is_some()
    }

    /// The node's keys (`[auth]`).
    pub fn keys(&self) -> Option<Arc<Keys>> {
        self.rules.read().node.keys.clone()
    }

    /// The keys that sign tokens for streams of `namespace`: its own, else the node's.
    pub fn keys_for(&self, namespace: &str) -> Option<Arc<Keys>> {
        self.rules.read().gate(namespace).keys.clone()
    }

    /// Decides a publish or play: the namespace (when `namespaces.strict`), the token (when
    /// the stream's namespace or the node has keys), then the webhook (when one is
    /// configured). A namespace with its own `auth` is decided by it alone.
    pub async fn check(&self, access: &Access<'_>) -> Result<(), Denied> {
        let rules = self.rules();
        let namespace = access.stream.namespace();
        if !rules.namespaces.admits(namespace) {
            return Err(Denied::forbidden(format!(
                "namespace {namespace} is not served here"
            )));
        }
        let gate = rules.gate(namespace);
        if let Some(keys) = &gate.keys {
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
            if claims.ns.as_deref().is_some_and(|n| n != namespace) {
                return Err(Denied::forbidden(format!(
                    "the token is for namespace {}",
                    claims.ns.as_deref().unwrap_or_default()
                )));
            }
            if let Some((room, identity)) = room_stream(access.stream) {
                check_room_access(&claims, access.action, room, identity)?;
            } else if !claims.allows(access.action) && !admin_watches(&claims, access.action) {
                return Err(Denied::forbidden(format!(
                    "token does not allow {}",
                    access.action.as_str()
                )));
            } else if !claims.covers(&stream) {
                return Err(Denied::forbidden(format!("token does not cover {stream}")));
            }
        }
        if let Some(hook) = &gate.webhook {
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
        let Some(keys) = self.keys() else {
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

    /// Decides an admin API call and says how far it reaches: a node admin token (the
    /// node's keys) reaches everything unless it claims `ns`; an admin token of a
    /// namespace's own keys reaches that namespace only.
    pub fn check_admin(&self, token: Option<&str>) -> Result<AdminScope, Denied> {
        let rules = self.rules();
        let namespaced = rules.gates.iter().filter(|(_, g)| g.keys.is_some());
        if rules.node.keys.is_none() && namespaced.clone().next().is_none() {
            return Err(Denied::forbidden(
                "admin calls need [auth] secrets or public_keys on this node",
            ));
        }
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Denied::unauthorized("an admin token is required"))?;
        let admin = |claims: Claims, own: Option<&str>| {
            if !claims.allows(Action::Admin) {
                return Err(Denied::forbidden("token does not allow admin"));
            }
            match (own, claims.ns) {
                (Some(own), Some(ns)) if ns != own => {
                    Err(Denied::forbidden("the token is for another namespace"))
                }
                (Some(own), _) => Ok(AdminScope::Namespace(own.to_string())),
                (None, Some(ns)) => Ok(AdminScope::Namespace(ns)),
                (None, None) => Ok(AdminScope::Node),
            }
        };
        let mut first_error = None;
        if let Some(keys) = &rules.node.keys {
            match keys.verify(token) {
                Ok(claims) => return admin(claims, None),
                Err(e) => first_error = Some(e),
            }
        }
        for (name, gate) in namespaced {
            if let Some(Ok(claims)) = gate.keys.as_ref().map(|k| k.verify(token)) {
                return admin(claims, Some(name));
            }
        }
        Err(Denied::unauthorized(
            first_error.map_or("token signature is not valid".into(), |e| e.to_string()),
        ))
    }

    /// Decides a `/metrics` scrape.
    pub fn check_metrics(&self, token: Option<&str>) -> Result<(), Denied> {
        match &self.rules.read().metrics_token {
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

/// An admin (the console's player) may watch what it administers.
fn admin_watches(claims: &Claims, action: Action) -> bool {
    action == Action::Play && claims.allows(Action::Admin)
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
        mint(&a.keys().unwrap(), act, streams, None)
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

    /// A node with its own secret, namespace `a` with its own, `open` declared without
    /// auth, and `strict` on.
    fn namespaced() -> (Auth, Keys, Keys) {
        let node_secret = "the-node-secret-0123";
        let a_secret = "namespace-a-secret-0123";
        let text = format!(
            "[auth]\nsecrets = [\"{node_secret}\"]\n[namespaces]\nstrict = true\n\
             [[namespace]]\nname = \"a\"\nauth = {{ secrets = [\"{a_secret}\"] }}\n\
             [[namespace]]\nname = \"open\"\n"
        );
        let c = crate::config::Config::parse(&text, "t.toml", std::path::Path::new(".")).unwrap();
        let auth = Auth::open("n1");
        auth.reconfigure(&c.auth, &Arc::new(c.namespaces)).unwrap();
        let node = Keys::new(&[node_secret.to_string()], &[] as &[&str]).unwrap();
        let a = Keys::new(&[a_secret.to_string()], &[] as &[&str]).unwrap();
        (auth, node, a)
    }

    fn mint(keys: &Keys, act: Action, streams: &[&str], ns: Option<&str>) -> String {
        keys.mint(&Claims {
            act: token::OneOrMany::One(act),
            streams: streams.iter().map(|s| s.to_string()).collect(),
            exp: token::now_s() + 60,
            nbf: None,
            iat: None,
            sub: None,
            room: None,
            name: None,
            ns: ns.map(str::to_string),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn a_namespace_with_its_own_keys_takes_only_its_tokens() {
        let (auth, node, a) = namespaced();
        let in_a = StreamKey::new("a", "cam").unwrap();
        let in_open = StreamKey::new("open", "cam").unwrap();
        let a_play = mint(&a, Action::Play, &["*"], None);
        auth.check(&access(Action::Play, &in_a, Some(&a_play)))
            .await
            .unwrap();
        // The namespace's token is nothing elsewhere, even with `*`...
        let e = auth
            .check(&access(Action::Play, &in_open, Some(&a_play)))
            .await
            .unwrap_err();
        assert_eq!(e.status, 401, "{e}");
        // ...and the node's token is nothing in the namespace.
        let node_play = mint(&node, Action::Play, &["*"], None);
        let e = auth
            .check(&access(Action::Play, &in_a, Some(&node_play)))
            .await
            .unwrap_err();
        assert_eq!(e.status, 401, "{e}");
        auth.check(&access(Action::Play, &in_open, Some(&node_play)))
            .await
            .unwrap();
        // A node token confined to `open` by its `ns` claim.
        let confined = mint(&node, Action::Play, &["*"], Some("open"));
        auth.check(&access(Action::Play, &in_open, Some(&confined)))
            .await
            .unwrap();
        // Strict: an undeclared namespace is refused whatever the token.
        let other = StreamKey::new("other", "cam").unwrap();
        let e = auth
            .check(&access(Action::Play, &other, Some(&node_play)))
            .await
            .unwrap_err();
        assert_eq!(e.status, 403);
        assert!(e.reason.contains("not served"), "{e}");
    }

    #[test]
    fn admin_tokens_reach_the_node_or_one_namespace() {
        let (auth, node, a) = namespaced();
        let admin = |k: &Keys, ns| mint(k, Action::Admin, &[], ns);
        assert_eq!(
            auth.check_admin(Some(&admin(&node, None))),
            Ok(AdminScope::Node)
        );
        assert_eq!(
            auth.check_admin(Some(&admin(&node, Some("open")))),
            Ok(AdminScope::Namespace("open".into()))
        );
        assert_eq!(
            auth.check_admin(Some(&admin(&a, None))),
            Ok(AdminScope::Namespace("a".into()))
        );
        // A namespace's keys cannot claim another namespace.
        assert_eq!(
            auth.check_admin(Some(&admin(&a, Some("open"))))
                .unwrap_err()
                .status,
            403
        );
        let publish = mint(&a, Action::Publish, &["*"], None);
        assert_eq!(auth.check_admin(Some(&publish)).unwrap_err().status, 403);
        assert_eq!(auth.check_admin(Some("junk")).unwrap_err().status, 401);
        assert!(AdminScope::Namespace("a".into()).covers("a"));
        assert!(!AdminScope::Namespace("a".into()).covers("open"));
    }

    #[test]
    fn queries_give_their_token() {
        assert_eq!(split_query("demo?token=abc&x=1"), ("demo", "token=abc&x=1"));
        assert_eq!(split_query("demo"), ("demo", ""));
        assert_eq!(token_from_query("x=1&token=a%2Eb").as_deref(), Some("a.b"));
        assert_eq!(token_from_query("x=1"), None);
    }
}
