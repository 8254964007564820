//! tls:// upstreams (DNS over TLS, RFC 7858): trust roots, the SPKI pin set, session resumption
//! and the handshake. Pooling and pipelining live in `pool`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::UpstreamError;
use super::config::{UpstreamConfig, load_ca_file, parse_pin};

/// TLS sessions remembered for resumption (a few per upstream is plenty).
const SESSION_CACHE_SIZE: usize = 64;

/// Handshake counters of one upstream.
#[derive(Debug, Default)]
pub(crate) struct HandshakeStats {
    pub(crate) full: AtomicU64,
    pub(crate) resumed: AtomicU64,
}

/// Builds the client configuration shared by all tls:// upstreams: trust roots from `ca_file`
/// or the system, the SPKI pin set, TLS 1.2+ and an in-memory session cache for resumption.
pub(crate) fn client_config(cfg: &UpstreamConfig) -> Result<Arc<ClientConfig>, UpstreamError> {
    let mut roots = RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            let certs = load_ca_file(path).map_err(|reason| UpstreamError::CaFile {
                path: path.clone(),
                reason,
            })?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(UpstreamError::CaFile {
                    path: path.clone(),
                    reason: "no usable CA certificate".to_owned(),
                });
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let reason = found
                    .errors
                    .first()
                    .map_or_else(|| "none installed".to_owned(), ToString::to_string);
                return Err(UpstreamError::NoSystemRoots { reason });
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| UpstreamError::TlsConfig(e.to_string()))?;
    let pins = cfg
        .spki_pins
        .iter()
        .map(|p| parse_pin(p).map_err(UpstreamError::TlsConfig))
        .collect::<Result<Vec<_>, _>>()?;
    let verifier = Arc::new(PinningVerifier {
        inner: webpki,
        pins,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::TlsConfig(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::in_memory_sessions(SESSION_CACHE_SIZE);
    Ok(Arc::new(config))
}

/// Runs the TLS handshake over `tcp`, giving up at `deadline`. Any verification or pin
/// failure is an error: there is no plaintext fallback.
pub(crate) async fn handshake(
    connector: &TlsConnector,
    name: ServerName<'static>,
    tcp: TcpStream,
    addr: SocketAddr,
    deadline: Instant,
    stats: &HandshakeStats,
) -> Result<TlsStream<TcpStream>, UpstreamError> {
    let name_text = name.to_str().into_owned();
    let stream = match timeout_at(deadline, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(UpstreamError::TlsHandshake {
                addr,
                name: name_text,
                source: Arc::new(e),
            });
        }
        Err(_) => return Err(UpstreamError::Timeout { addr }),
    };
    match stream.get_ref().1.handshake_kind() {
        Some(HandshakeKind::Resumed) => stats.resumed.fetch_add(1, Ordering::Relaxed),
        _ => stats.full.fetch_add(1, Ordering::Relaxed),
    };
    Ok(stream)
}

/// The base64 SHA-256 of a certificate's SubjectPublicKeyInfo, as written in `spki_pins`.
pub fn spki_pin(cert_der: &[u8]) -> Result<String, UpstreamError> {
    use base64::Engine as _;
    let der = CertificateDer::from(cert_der);
    let digest = spki_sha256(&der).map_err(|e| UpstreamError::TlsConfig(e.to_string()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(digest))
}

fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], rustls::Error> {
    let parsed = ParsedCertificate::try_from(cert)?;
    Ok(Sha256::digest(parsed.subject_public_key_info().as_ref()).into())
}

// === impl PinningVerifier ===

/// WebPKI verification, then (if pins are configured) the leaf's SPKI must match one pin.
#[derive(Debug)]
struct PinningVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pins: Vec<[u8; 32]>,
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if self.pins.is_empty() {
            return Ok(verified);
        }
        let hash = spki_sha256(end_entity)?;
        if self.pins.iter().any(|p| p == &hash) {
            Ok(verified)
        } else {
            Err(rustls::Error::General(
                "server key matches none of upstream.spki_pins".to_owned(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
