//! Signed access tokens (JWT, with the `jsonwebtoken` crate): what they claim, how they are
//! checked and minted.
//!
//! A token names what its holder may do (`act`: `publish`, `play`, `admin`, `join`, one or
//! a list) and on which streams (`streams`: `live/demo`, `live/*`, `*`), and when (`exp`,
//! `nbf`). A `join` token admits its holder to one room (`room`) as one participant (`sub`,
//! the identity; `name`, shown to the others): it lets it publish its own stream in the
//! room and play the others', and nothing outside the room.
//! Keys: HS256 secrets (the first signs, all verify, so a secret can be rotated), and
//! Ed25519 or ES256 public keys for tokens minted elsewhere. Nothing here does I/O except
//! reading the PEM files named in the config when the keys are built.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{read_public_key, PublicKey};

/// What a token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Publish,
    Play,
    Admin,
    Join,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Play => "play",
            Action::Admin => "admin",
            Action::Join => "join",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "publish" => Some(Action::Publish),
            "play" => Some(Action::Play),
            "admin" => Some(Action::Admin),
            "join" => Some(Action::Join),
            _ => None,
        }
    }
}

/// One value or a list (`"act": "play"` or `"act": ["play", "publish"]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: PartialEq> OneOrMany<T> {
    fn contains(&self, x: &T) -> bool {
        match self {
            OneOrMany::One(v) => v == x,
            OneOrMany::Many(vs) => vs.contains(x),
        }
    }
}

/// A token's claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub act: OneOrMany<Action>,
    /// Stream patterns; an admin token may leave it out (all streams).
    #[serde(default)]
    pub streams: Vec<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Who the token was issued to (free text, for the operator's logs and hooks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The room a `join` token admits to (its id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// The name a participant is shown by (`join` tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The one namespace the token is good for: an admin token claiming it administers
    /// that namespace only; a publish or play token is refused anywhere else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ns: Option<String>,
}

impl Claims {
    pub fn allows(&self, action: Action) -> bool {
        self.act.contains(&action)
    }

    /// Whether a pattern covers `stream` (`ns/name`); an admin token without patterns
    /// covers every stream.
    pub fn covers(&self, stream: &str) -> bool {
        if self.streams.is_empty() {
            return self.allows(Action::Admin);
        }
        self.streams.iter().any(|p| pattern_matches(p, stream))
    }
}

/// `*` matches any run of characters (the `/` between namespace and name included); every
/// other character matches itself. Linear-time (greedy with one backtrack point).
pub fn pattern_matches(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Why a token was not accepted. The texts go to clients: they say what is wrong, never
/// what the token contained.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is not valid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token algorithm {0} is not accepted here")]
    Algorithm(String),
    #[error("token claims are not valid: {0}")]
    Claims(String),
}

/// Seconds of clock difference allowed on `exp` and `nbf`.
const LEEWAY_S: u64 = 30;

/// The keys a node verifies tokens with (and signs with, when it has a secret).
pub struct Keys {
    secrets: Vec<DecodingKey>,
    signer: Option<EncodingKey>,
    ed25519: Vec<DecodingKey>,
    es256: Vec<DecodingKey>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Keys")
            .field("secrets", &self.secrets.len())
            .field("ed25519", &self.ed25519.len())
            .field("es256", &self.es256.len())
            .finish()
    }
}

impl Keys {
    /// Builds the keys; a public key file that is not an Ed25519 or P-256 PEM is an error
    /// naming the file.
    pub fn new(secrets: &[String], public_keys: &[impl AsRef<Path>]) -> Result<Keys, String> {
        let mut keys = Keys {
            secrets: Vec::new(),
            signer: None,
            ed25519: Vec::new(),
            es256: Vec::new(),
        };
        for s in secrets {
            keys.secrets
                .push(DecodingKey::from_secret(s.as_bytes()).map_err(|e| format!("secret: {e}"))?);
        }
        if let Some(first) = secrets.first() {
            keys.signer =
                Some(EncodingKey::from_secret(first.as_bytes()).map_err(|e| e.to_string())?);
        }
        for path in public_keys {
            match read_public_key(path.as_ref())? {
                PublicKey::Ed25519(k) => keys.ed25519.push(k),
                PublicKey::Es256(k) => keys.es256.push(k),
            }
        }
        Ok(keys)
    }

    /// Signs `claims` with the first secret.
    pub fn mint(&self, claims: &Claims) -> Result<String, String> {
        let key = self
            .signer
            .as_ref()
            .ok_or("no [auth] secrets to sign with (public keys only verify)")?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, key).map_err(|e| e.to_string())
    }

    /// Checks the signature and the times of `token` against every key of its algorithm.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let keys = match header.alg {
            Algorithm::HS256 => &self.secrets,
            Algorithm::EdDSA => &self.ed25519,
            Algorithm::ES256 => &self.es256,
            other => return Err(TokenError::Algorithm(format!("{other:?}"))),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_S;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        let mut last = TokenError::BadSignature;
        for key in keys {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::InvalidSignature => TokenError::BadSignature,
                        // The signature matched this key: the verdict is final.
                        K::ExpiredSignature => return Err(TokenError::Expired),
                        K::ImmatureSignature => return Err(TokenError::NotYetValid),
                        K::MissingRequiredClaim(c) => {
                            return Err(TokenError::Claims(format!("{c} is missing")))
                        }
                        K::Json(_) | K::InvalidClaimFormat(_) => {
                            return Err(TokenError::Claims("unexpected claim shapes".into()))
                        }
                        _ => TokenError::Malformed,
                    };
                }
            }
        }
        Err(last)
    }
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    crate::clock::unix_s()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(
            &["first-secret-0123456789".into(), "old-secret".into()],
            &[] as &[&str],
        )
        .unwrap()
    }

    fn claims(act: Action, streams: &[&str], exp_in: i64) -> Claims {
        Claims {
            act: OneOrMany::One(act),
            streams: streams.iter().map(|s| s.to_string()).collect(),
            exp: (now_s() as i64 + exp_in) as u64,
            nbf: None,
            iat: Some(now_s()),
            sub: None,
            room: None,
            name: None,
            ns: None,
        }
    }

    #[test]
    fn patterns_match_names_and_namespaces() {
        for (p, t, m) in [
            ("live/demo", "live/demo", true),
            ("live/demo", "live/demo2", false),
            ("live/*", "live/demo", true),
            ("live/*", "other/demo", false),
            ("*", "x/y", true),
            ("*/cam", "a/cam", true),
            ("li*e/d*o", "live/demo", true),
            ("live/*x", "live/demo", false),
            ("", "live/demo", false),
        ] {
            assert_eq!(pattern_matches(p, t), m, "{p} ~ {t}");
        }
    }

    #[test]
    fn minted_tokens_verify_with_every_secret_and_carry_their_claims() {
        let k = keys();
        let c = claims(Action::Publish, &["live/*"], 60);
        let t = k.mint(&c).unwrap();
        assert_eq!(k.verify(&t).unwrap(), c);
        // Rotation: a node that lists the old secret first still verifies the new one's.
        let rotated = Keys::new(
            &["old-secret".into(), "first-secret-0123456789".into()],
            &[] as &[&str],
        )
        .unwrap();
        assert_eq!(rotated.verify(&t).unwrap(), c);
        assert!(c.allows(Action::Publish) && !c.allows(Action::Play));
        assert!(c.covers("live/x") && !c.covers("vod/x"));
    }

    #[test]
    fn bad_tokens_say_why() {
        let k = keys();
        let expired = k.mint(&claims(Action::Play, &["*"], -3600)).unwrap();
        assert_eq!(k.verify(&expired), Err(TokenError::Expired));
        let mut early = claims(Action::Play, &["*"], 7200);
        early.nbf = Some(now_s() + 3600);
        assert_eq!(
            k.verify(&k.mint(&early).unwrap()),
            Err(TokenError::NotYetValid)
        );
        let other = Keys::new(&["someone-else".into()], &[] as &[&str]).unwrap();
        let forged = other.mint(&claims(Action::Admin, &[], 60)).unwrap();
        assert_eq!(k.verify(&forged), Err(TokenError::BadSignature));
        assert_eq!(k.verify("not.a.token"), Err(TokenError::Malformed));
        assert_eq!(k.verify(""), Err(TokenError::Malformed));
        // An unsigned token ("alg": "none") is refused.
        let none = "eyJhbGciOiJub25lIn0.eyJhY3QiOiJhZG1pbiIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(k.verify(none).is_err());
    }
}
