//! One DTLS configuration for every WebRTC session of the process.
//!
//! str0m's aws-lc-rs provider builds a new `dimpl::Config` for each `Rtc`, and building one
//! validates the crypto provider: it runs ECDH key exchanges and ECDSA verifications as a
//! self-test, about half of the CPU a node spends answering an offer (measured by
//! `benches/whep_join.rs`). This provider builds the configuration once per MTU and shares
//! it; the certificate generation and the DTLS state machine stay str0m's and dimpl's,
//! called exactly as str0m's own provider calls them. Everything else (SRTP, hashes) is
//! str0m's default provider.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion,
};
use str0m::crypto::CryptoProvider;
use str0m_proto::crypto::CryptoError;

/// str0m's default crypto provider with [`SharedConfigDtls`] for DTLS.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
        Arc::new(CryptoProvider {
            dtls_provider: &SHARED,
            ..str0m::crypto::from_feature_flags()
        })
    });
    PROVIDER.clone()
}

static SHARED: SharedConfigDtls = SharedConfigDtls {
    configs: parking_lot::Mutex::new(Vec::new()),
};

/// dimpl's DTLS with one configuration per MTU, built (and validated) once.
#[derive(Debug)]
pub struct SharedConfigDtls {
    configs: parking_lot::Mutex<Vec<(Option<usize>, Arc<dimpl::Config>)>>,
}

impl SharedConfigDtls {
    fn config(&self, mtu: Option<usize>) -> Result<Arc<dimpl::Config>, CryptoError> {
        let mut configs = self.configs.lock();
        if let Some((_, c)) = configs.iter().find(|(m, _)| *m == mtu) {
            return Ok(c.clone());
        }
        // As str0m's provider configures it: ICE has verified return routability before
        // DTLS starts, so server cookies are redundant.
        let mut builder = dimpl::Config::builder().use_server_cookie(false);
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        let config = Arc::new(
            builder
                .build()
                .map_err(|e| CryptoError::Other(format!("dimpl config creation failed: {e}")))?,
        );
        configs.push((mtu, config.clone()));
        Ok(config)
    }
}

impl DtlsProvider for SharedConfigDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        dimpl::certificate::generate_self_signed_certificate().ok()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let config = self.config(mtu)?;
        let cert = cert.clone();
        let dtls = match dtls_version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert, now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert, now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert, now),
            other => {
                return Err(CryptoError::Other(format!(
                    "unsupported DTLS version: {other}"
                )))
            }
        };
        Ok(Box::new(SharedDtls(dtls)))
    }
}

/// A dimpl DTLS instance behind str0m's trait.
struct SharedDtls(dimpl::Dtls);

impl std::fmt::Debug for SharedDtls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDtls").finish()
    }
}

impl DtlsInstance for SharedDtls {
    fn set_active(&mut self, active: bool) {
        self.0.set_active(active);
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.0.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        self.0.poll_output(buf)
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.0.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.0.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.0.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.0.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.0.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.0.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_share_one_config_per_mtu() {
        let p = crypto_provider();
        let cert = p.dtls_provider.generate_certificate().unwrap();
        for mtu in [None, Some(1200)] {
            assert!(p
                .dtls_provider
                .new_dtls(&cert, Instant::now(), DtlsVersion::Dtls12, mtu)
                .is_ok());
        }
        let (a, b) = (SHARED.config(Some(1200)), SHARED.config(Some(1200)));
        assert!(Arc::ptr_eq(&a.unwrap(), &b.unwrap()));
        let (a, b) = (SHARED.config(None), SHARED.config(Some(1200)));
        assert!(!Arc::ptr_eq(&a.unwrap(), &b.unwrap()));
    }
}
