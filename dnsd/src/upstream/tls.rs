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
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::config::{UpstreamConfig, load_ca_file, parse_pin};
use super::{UpstreamError, by_deadline};

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
    tcp: super::tcp::Stream,
    addr: SocketAddr,
    deadline: Instant,
    stats: &HandshakeStats,
) -> Result<TlsStream<super::tcp::Stream>, UpstreamError> {
    let name_text = name.to_str().into_owned();
    let stream = by_deadline(deadline, addr, async {
        connector
            .connect(name, tcp)
            .await
            .map_err(|e| UpstreamError::TlsHandshake {
                addr,
                name: name_text,
                source: Arc::new(e),
            })
    })
    .await?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::HashSet;
    use std::time::Duration;

    use tokio::task::JoinSet;

    use super::super::testutil::{Pki, assert_answers, config, query, tls_server, wait_for};
    use super::super::{Protocol, QUERY_BLOCK_LEN, UpstreamConfig, Upstreams};
    use super::*;

    fn tls_config(url: String, ca: &tempfile::NamedTempFile) -> UpstreamConfig {
        UpstreamConfig {
            ca_file: Some(ca.path().to_owned()),
            ..config(vec![url])
        }
    }

    #[tokio::test]
    async fn pipelines_100_out_of_order_queries_on_one_connection() {
        let pki = Pki::new(&["dns.test"]);
        let server = tls_server(&pki).await;
        let ca = pki.ca_file();
        let cfg = UpstreamConfig {
            tls_connections: 1,
            ..tls_config(server.tls_url("dns.test"), &ca)
        };
        let ups = Upstreams::new(&cfg).unwrap();
        let mut set = JoinSet::new();
        for i in 0..100u32 {
            let ups = ups.clone();
            // Every client uses ID 7: only per-connection ID rewriting keeps them apart.
            // Delays decrease with i so that answers come back in reverse order.
            let name = format!("delay-{}.q{i}.test.", 200 - 2 * i);
            set.spawn(async move { (ups.query(&query(&name, 7)).await, name) });
        }
        while let Some(res) = set.join_next().await {
            let (answer, name) = res.unwrap();
            let answer = answer.unwrap();
            assert_answers(&answer.response, &name, 7);
            assert_eq!(answer.protocol, Protocol::Tls);
            assert_eq!(answer.url.as_ref(), server.tls_url("dns.test").as_str());
        }
        assert_eq!(server.connections(), 1);
        let ids: HashSet<u16> = server.stats.ids.lock().iter().copied().collect();
        assert_eq!(ids.len(), 100, "one distinct ID per in-flight query");
        // RFC 8467: every query to a TLS upstream is padded to a multiple of 128 octets.
        for len in server.stats.lens.lock().iter() {
            assert_eq!(len % QUERY_BLOCK_LEN, 0, "query length {len}");
        }
        let h = &ups.health()[0];
        assert!(h.healthy);
        assert_eq!(h.queries, 100);
        assert_eq!(h.errors, 0);
        assert_eq!(h.open_connections, 1);
        assert_eq!(h.tls_handshakes_full, 1);
    }

    #[tokio::test]
    async fn pool_reuses_connections_over_1000_queries_and_resumes_sessions() {
        let pki = Pki::new(&["dns.test"]);
        let server = tls_server(&pki).await;
        let ca = pki.ca_file();
        let ups = Upstreams::new(&tls_config(server.tls_url("dns.test"), &ca)).unwrap();
        for batch in 0..20 {
            let mut set = JoinSet::new();
            for i in 0..50 {
                let ups = ups.clone();
                let name = format!("b{batch}-{i}.test.");
                set.spawn(async move {
                    let a = ups.query(&query(&name, 1)).await.unwrap();
                    assert_answers(&a.response, &name, 1);
                });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap();
            }
        }
        assert_eq!(server.queries(), 1000);
        assert!(
            server.connections() <= 2,
            "{} handshakes",
            server.connections()
        );
        let before = ups.health()[0].clone();
        assert_eq!(before.tls_handshakes_full, 1, "{before:?}");
        assert!(before.tls_handshakes_resumed <= 1, "{before:?}");

        // After the pool is closed, the next connection resumes the TLS session.
        ups.shutdown().await;
        wait_for(&ups, "pool closed", |u| u.health()[0].open_connections == 0).await;
        let a = ups.query(&query("again.test.", 2)).await.unwrap();
        assert_answers(&a.response, "again.test.", 2);
        let h = ups.health()[0].clone();
        assert_eq!(h.tls_handshakes_full, 1, "{h:?}");
        assert_eq!(
            h.tls_handshakes_resumed,
            before.tls_handshakes_resumed + 1,
            "{h:?}"
        );
        assert_eq!(
            server
                .stats
                .resumed
                .load(std::sync::atomic::Ordering::SeqCst) as u64,
            h.tls_handshakes_resumed
        );
    }

    /// Regression (LESSONS #10): dns-tool took a single SPKI pin, so a key rotation broke it.
    #[tokio::test]
    async fn dns_tool_single_pin_broke_on_key_rotation() {
        let pki = Pki::new(&["dns.test"]);
        let other = Pki::new(&["dns.test"]);
        let server = tls_server(&pki).await;
        let ca = pki.ca_file();
        // The production pin helper agrees with the independently computed one.
        assert_eq!(spki_pin(&pki.server_chain[0]).unwrap(), pki.pin);
        for pins in [
            vec![other.pin.clone(), pki.pin.clone()],
            vec![pki.pin.clone(), other.pin.clone()],
        ] {
            let cfg = UpstreamConfig {
                spki_pins: pins,
                ..tls_config(server.tls_url("dns.test"), &ca)
            };
            let ups = Upstreams::new(&cfg).unwrap();
            let a = ups.query(&query("pinned.test.", 3)).await.unwrap();
            assert_answers(&a.response, "pinned.test.", 3);
        }
    }

    #[tokio::test]
    async fn spki_pin_mismatch_fails_without_plaintext_fallback() {
        let pki = Pki::new(&["dns.test"]);
        let server = tls_server(&pki).await;
        // Anything falling back to plaintext DNS on the same port would land here.
        let udp = tokio::net::UdpSocket::bind(server.addr).await.unwrap();
        let ca = pki.ca_file();
        let cfg = UpstreamConfig {
            spki_pins: vec![Pki::new(&["x"]).pin, Pki::new(&["y"]).pin],
            ..tls_config(server.tls_url("dns.test"), &ca)
        };
        let ups = Upstreams::new(&cfg).unwrap();
        let err = ups.query(&query("pinned.test.", 3)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::TlsHandshake { .. }), "{err}");
        assert!(err.to_string().contains("spki_pins"), "{err}");
        assert_eq!(server.queries(), 0, "no query reached the server");
        let mut buf = [0u8; 512];
        assert!(
            udp.try_recv_from(&mut buf).is_err(),
            "no plaintext UDP fallback"
        );
        let h = &ups.health()[0];
        assert_eq!(h.errors, 1);
        assert!(h.last_error.contains("spki_pins"), "{h:?}");
    }

    #[tokio::test]
    async fn wrong_ca_fails() {
        let pki = Pki::new(&["dns.test"]);
        let server = tls_server(&pki).await;
        let wrong = Pki::new(&["dns.test"]).ca_file();
        let ups = Upstreams::new(&tls_config(server.tls_url("dns.test"), &wrong)).unwrap();
        let err = ups.query(&query("a.test.", 3)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::TlsHandshake { .. }), "{err}");
        assert!(
            err.to_string().contains("invalid peer certificate"),
            "{err}"
        );
        assert_eq!(server.queries(), 0);
    }

    #[tokio::test]
    async fn server_name_mismatch_fails_and_ip_san_works_without_name() {
        let pki = Pki::new(&["dns.test", "127.0.0.1"]);
        let server = tls_server(&pki).await;
        let ca = pki.ca_file();
        let ups = Upstreams::new(&tls_config(server.tls_url("other.test"), &ca)).unwrap();
        let err = ups.query(&query("a.test.", 3)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::TlsHandshake { .. }), "{err}");
        assert!(err.to_string().contains("not valid for name"), "{err}");

        let url = format!("tls://{}", server.addr);
        let ups = Upstreams::new(&tls_config(url, &ca)).unwrap();
        let a = ups.query(&query("a.test.", 3)).await.unwrap();
        assert_answers(&a.response, "a.test.", 3);
    }

    /// Regression (LESSONS #10): dot-proxy died when its upstream connection broke. Here the
    /// connection is reset with queries in flight, and every one of them is still answered.
    #[tokio::test]
    async fn dot_proxy_died_when_its_upstream_connection_broke() {
        let pki = Pki::new(&["dns.test"]);
        let server = tls_server(&pki).await;
        server
            .behavior
            .kill_after
            .store(20, std::sync::atomic::Ordering::SeqCst);
        let ca = pki.ca_file();
        let cfg = UpstreamConfig {
            tls_connections: 1,
            ..tls_config(server.tls_url("dns.test"), &ca)
        };
        let ups = Upstreams::new(&cfg).unwrap();
        let mut set = JoinSet::new();
        for i in 0..50 {
            let ups = ups.clone();
            let name = format!("delay-100.k{i}.test.");
            set.spawn(async move { (ups.query(&query(&name, 9)).await, name) });
        }
        while let Some(r) = set.join_next().await {
            let (answer, name) = r.unwrap();
            assert_answers(&answer.unwrap().response, &name, 9);
        }
        assert!(server.connections() >= 2, "a new connection was opened");
        let h = &ups.health()[0];
        assert!(h.healthy);
        assert_eq!(
            h.errors, 0,
            "retries on a new connection are not upstream failures"
        );
    }

    #[tokio::test]
    async fn garbage_over_tls_is_an_error_not_a_panic() {
        let pki = Pki::new(&["dns.test"]);
        let server = tls_server(&pki).await;
        let ca = pki.ca_file();
        let cfg = UpstreamConfig {
            timeout: Duration::from_millis(600),
            attempt_timeout: Duration::from_millis(600),
            max_failures: 100,
            ..tls_config(server.tls_url("dns.test"), &ca)
        };
        let ups = Upstreams::new(&cfg).unwrap();
        let err = ups.query(&query("wrongq.test.", 1)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::BadResponse { .. }), "{err}");
        let err = ups.query(&query("short.test.", 1)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::ConnectionLost { .. }), "{err}");
        let err = ups.query(&query("wrongid.test.", 1)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Timeout { .. }), "{err}");
        let _ = ups.query(&query("garbage.test.", 1)).await.unwrap_err();
        assert!(ups.health()[0].errors >= 4);
        // The upstream still works afterwards.
        let a = ups.query(&query("fine.test.", 1)).await.unwrap();
        assert_answers(&a.response, "fine.test.", 1);
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let pki = Pki::new(&["dns.test"]);
        let server = tls_server(&pki).await;
        let ca = pki.ca_file();
        let cfg = UpstreamConfig {
            idle_timeout: Duration::from_millis(100),
            ..tls_config(server.tls_url("dns.test"), &ca)
        };
        let ups = Upstreams::new(&cfg).unwrap();
        ups.query(&query("a.test.", 1)).await.unwrap();
        assert_eq!(ups.health()[0].open_connections, 1);
        wait_for(&ups, "idle close", |u| u.health()[0].open_connections == 0).await;
        ups.query(&query("b.test.", 1)).await.unwrap();
        assert_eq!(server.connections(), 2);
    }

    #[tokio::test]
    async fn construction_does_no_network_io() {
        let pki = Pki::new(&["dns.test"]);
        let ca = pki.ca_file();
        let ups = Upstreams::new(&tls_config("tls://127.0.0.1:9#dns.test".into(), &ca)).unwrap();
        let h = &ups.health()[0];
        assert_eq!((h.queries, h.open_connections, h.srtt_us), (0, 0, 0));
        assert!(h.healthy);
    }
}
