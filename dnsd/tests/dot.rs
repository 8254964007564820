//! The DNS-over-TLS listener (RFC 7858): a TLS client with ALPN "dot" gets pipelined answers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::*;
use dnsd::config::TlsListenConfig;
use dnsd::listener::Sockets;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn dot_listener_answers_pipelined_queries() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["dns.test".to_owned()]).unwrap();
    let cert_pem = ck.cert.pem();
    let cert = dir.path().join("dot.crt");
    let key = dir.path().join("dot.key");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();

    let upstream = fake_upstream(Arc::new(|q| {
        Some(reply(q, &["example.com. 300 A 192.0.2.1"]))
    }))
    .await;
    let mut cfg = base_config(upstream.addr, dir.path());
    let fwd = FakeFwd::new();
    serve_fake_fwd(cfg.authorize.socket.clone(), fwd.clone());
    cfg.listen.tls = Some(TlsListenConfig {
        addrs: vec![],
        cert,
        key,
        handshake_timeout: std::time::Duration::from_secs(2),
    });
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    let tls = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tls.local_addr().unwrap();
    let sockets = Sockets {
        tls: vec![tls],
        ..Sockets::default()
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(dnsd::run(cfg, sockets, shutdown.clone(), None));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"dot".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("dns.test").unwrap();
    let mut s = connector.connect(name, tcp).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"dot"[..]));

    let queries = [
        query("example.com.", RecordType::A, true),
        query("example.com.", RecordType::A, false),
    ];
    for q in &queries {
        let wire = q.to_vec().unwrap();
        let mut frame = (wire.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(&wire);
        s.write_all(&frame).await.unwrap();
    }
    let mut ids = Vec::new();
    for _ in &queries {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addrs(&m).len(), 1);
        ids.push(m.metadata.id);
    }
    ids.sort_unstable();
    let mut want: Vec<u16> = queries.iter().map(|q| q.metadata.id).collect();
    want.sort_unstable();
    assert_eq!(ids, want);
    // Both were in flight at once (no request coalescing), so each may have been authorized.
    assert!((1..=2).contains(&fwd.calls().len()));

    shutdown.cancel();
    task.await.unwrap().unwrap();
}
