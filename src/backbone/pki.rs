//! A cluster CA and per-node certificates for mutual TLS on the backbone (`meshcast cert`),
//! and the check that a peer's certificate names the node it says it is.
//!
//! With `backbone.ca` and a node certificate configured, each side of a link presents its
//! certificate and verifies the other's against the CA; once the hello names the peer, its
//! certificate must carry that node's name ([`node_dns_name`]). A node holding the cluster
//! token but not a certificate for an id can then not speak as that id.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};

use super::tls::SERVER_NAME;

/// The common name of the cluster CA (it must stay the same: node certificates are issued
/// in its name).
const CA_NAME: &str = "meshcast cluster CA";

/// The DNS name a node certificate carries for node `id`: the id in hex, in labels of at
/// most 60 characters, under `node.meshcast` (node ids may hold characters, and a case,
/// that DNS names cannot).
pub fn node_dns_name(id: &str) -> String {
    let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
    let mut labels: Vec<&str> = Vec::new();
    let mut rest = hex.as_str();
    while !rest.is_empty() {
        let (head, tail) = rest.split_at(rest.len().min(60));
        labels.push(head);
        rest = tail;
    }
    format!("{}.node.meshcast", labels.join("."))
}

/// Whether `cert` (a peer's end-entity certificate, already verified against the CA by
/// TLS) names node `id`.
pub fn names_node(cert: &CertificateDer<'_>, id: &str) -> Result<(), CertificateError> {
    let name = ServerName::try_from(node_dns_name(id))
        .map_err(|_| CertificateError::NoName(id.to_string()))?;
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| CertificateError::Unreadable(e.to_string()))?;
    ee.verify_is_valid_for_subject_name(&name)
        .map_err(|_| CertificateError::OtherNode(id.to_string()))
}

/// Why a peer's certificate does not vouch for the node its hello names.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertificateError {
    #[error("the peer showed no certificate")]
    Missing,
    #[error("node id {0} makes no certificate name")]
    NoName(String),
    #[error("unreadable peer certificate: {0}")]
    Unreadable(String),
    #[error("the peer's certificate does not name node {0}")]
    OtherNode(String),
}

/// The certificate the peer of `conn` presented, if any.
pub fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().cloned()
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days as i64);
}

fn write_private(path: &Path, pem: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(pem.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn write_public(path: &Path, pem: &str) -> Result<(), String> {
    std::fs::write(path, pem).map_err(|e| format!("{}: {e}", path.display()))
}

/// Makes a cluster CA in `dir`: `ca.pem` (give it to every node as `backbone.ca`) and
/// `ca-key.pem` (keep it off the nodes). Refuses to overwrite an existing CA.
pub fn make_ca(dir: &Path, days: u32) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if cert_path.exists() || key_path.exists() {
        return Err(format!("{} already holds a CA", dir.display()));
    }
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = ca_params();
    validity(&mut params, days);
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    write_private(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok(vec![cert_path, key_path])
}

/// Issues node `id` a certificate from the CA in `ca_dir`, written to `out` as
/// `{id}.pem` and `{id}-key.pem` (`backbone.cert` and `backbone.key`).
pub fn make_node_cert(
    ca_dir: &Path,
    id: &str,
    out: &Path,
    days: u32,
) -> Result<Vec<PathBuf>, String> {
    let read =
        |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()));
    let ca_key = KeyPair::from_pem(&read(ca_dir.join("ca-key.pem"))?).map_err(|e| e.to_string())?;
    // rcgen signs in the issuer's name with its key: the CA's parameters (its fixed name)
    // and key are all a node certificate needs from it.
    let issuer = ca_params()
        .self_signed(&ca_key)
        .map_err(|e| e.to_string())?;
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string(), node_dns_name(id)])
        .map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("meshcast node {id}"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, days);
    let cert = params
        .signed_by(&key, &issuer, &ca_key)
        .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let (cert_path, key_path) = (
        out.join(format!("{id}.pem")),
        out.join(format!("{id}-key.pem")),
    );
    write_private(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok(vec![cert_path, key_path])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn node_names_are_dns_safe_and_distinct() {
        assert_eq!(node_dns_name("a_B"), "615f42.node.meshcast");
        assert_ne!(node_dns_name("ab"), node_dns_name("AB"));
        let long = "x".repeat(64);
        assert!(node_dns_name(&long).split('.').all(|l| l.len() <= 63));
        assert!(ServerName::try_from(node_dns_name(&long)).is_ok());
    }

    #[test]
    fn a_node_certificate_names_its_node_and_no_other() {
        let dir = std::env::temp_dir().join(format!("meshcast-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        make_ca(&dir, 30).unwrap();
        assert!(make_ca(&dir, 30).is_err(), "a CA is never overwritten");
        let files = make_node_cert(&dir, "origin_a", &dir, 30).unwrap();
        let cert = CertificateDer::from_pem_file(&files[0]).unwrap();
        names_node(&cert, "origin_a").unwrap();
        assert!(names_node(&cert, "origin_b").is_err());
        let mode = std::fs::metadata(&files[1]).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
