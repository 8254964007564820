//! Authorize-before-answer, in process: dnsd's `run` with a fake upstream on 127.0.0.1 and a fake fwd on a Unix socket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use dnsd::config::OnFwdError;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An upstream that knows a few names.
fn zone() -> Responder {
    Arc::new(|q| {
        let name = q.queries[0].name().to_ascii().to_ascii_lowercase();
        let qtype = q.queries[0].query_type();
        let answers: Vec<&str> = match (name.as_str(), qtype) {
            ("example.com.", RecordType::A) => {
                vec![
                    "example.com. 300 A 192.0.2.1",
                    "example.com. 300 A 192.0.2.2",
                ]
            }
            ("example.com.", RecordType::AAAA) => vec!["example.com. 300 AAAA 2001:db8::1"],
            ("example.com.", RecordType::TXT) => vec!["example.com. 300 TXT hello"],
            ("www.example.com.", RecordType::A) => vec![
                "www.example.com. 60 CNAME edge.cdn.test.",
                "edge.cdn.test. 300 A 198.51.100.7",
                "evil.test. 300 A 203.0.113.66",
            ],
            ("sinkhole.test.", RecordType::A) => vec!["sinkhole.test. 300 A 0.0.0.0"],
            ("big.test.", RecordType::TXT) => {
                return Some(reply(
                    q,
                    &(0..15)
                        .map(|_| "big.test. 300 TXT xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")
                        .collect::<Vec<_>>(),
                ));
            }
            ("garbage.test.", _) => {
                // A header claiming one answer, then junk.
                let mut b = reply(q, &[]);
                b[7] = 1;
                b.extend_from_slice(&[0xc0, 0xff, 0xff]);
                return Some(b);
            }
            _ => vec![],
        };
        Some(reply(q, &answers))
    })
}

struct Setup {
    dnsd: Dnsd,
    fwd: Arc<FakeFwd>,
    upstream: FakeUpstream,
}

async fn setup(edit: impl FnOnce(&mut dnsd::Config)) -> Setup {
    setup_with(zone(), true, edit).await
}

async fn setup_with(
    responder: Responder,
    with_fwd: bool,
    edit: impl FnOnce(&mut dnsd::Config),
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let upstream = fake_upstream(responder).await;
    let mut cfg = base_config(upstream.addr, dir.path());
    edit(&mut cfg);
    let fwd = FakeFwd::new();
    if with_fwd {
        serve_fake_fwd(cfg.authorize.socket.clone(), fwd.clone());
    }
    let dnsd = start_dnsd(cfg, dir);
    Setup {
        dnsd,
        fwd,
        upstream,
    }
}

/// Holds fwd's next Authorize, sends `q` from 127.0.0.1 (waiting up to `wait` for its
/// answer) and returns once fwd has the request; `what` says what failed if it never does.
async fn query_held_by_fwd(
    s: &Setup,
    q: hickory_proto::op::Message,
    wait: Duration,
    what: &str,
) -> tokio::task::JoinHandle<Option<hickory_proto::op::Message>> {
    *s.fwd.hold.lock() = true;
    let udp = s.dnsd.udp;
    let pending = tokio::spawn(async move { udp_query_from(udp, "127.0.0.1", &q, wait).await });
    tokio::time::timeout(Duration::from_secs(3), s.fwd.entered.notified())
        .await
        .expect(what);
    pending
}

#[tokio::test]
async fn answer_is_released_only_after_authorize_returns() {
    let s = setup(|_| {}).await;
    let q = query("Example.COM.", RecordType::A, true);
    let pending = query_held_by_fwd(&s, q, Duration::from_secs(5), "Authorize never called").await;
    // fwd has the request, and is holding it: no answer may have been sent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !pending.is_finished(),
        "answer released before fwd confirmed"
    );
    s.fwd.release.notify_one();
    let resp = pending.await.unwrap().expect("no answer after release");
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&resp), vec![ip("192.0.2.1"), ip("192.0.2.2")]);
    let calls = s.fwd.calls();
    assert_eq!(calls.len(), 1, "one batched call per answer");
    assert_eq!(grant_ips(&calls[0]), vec![ip("192.0.2.1"), ip("192.0.2.2")]);
    assert_eq!(calls[0].qname, "example.com");
    assert_eq!(calls[0].client, vec![127, 0, 0, 1]);
    assert_eq!(calls[0].reason, "answer");
    assert!(calls[0].grants.iter().all(|g| g.ttl_s == 300));
    // The client's 0x20 casing is echoed.
    assert_eq!(resp.queries[0].name().to_ascii(), "Example.COM.");
}

#[tokio::test]
async fn fwd_down_gives_servfail() {
    let s = setup_with(zone(), false, |_| {}).await;
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
    assert!(resp.answers.is_empty());
    // Non-address queries do not need fwd.
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::TXT, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert_eq!(resp.answers.len(), 1);
}

#[tokio::test]
async fn fwd_down_with_on_fwd_error_answer_releases() {
    let s = setup_with(zone(), false, |c| {
        c.authorize.on_fwd_error = OnFwdError::Answer
    })
    .await;
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&resp).len(), 2);
}

#[tokio::test]
async fn fwd_restart_between_answers_is_transparent() {
    let s = setup_with(zone(), false, |_| {}).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let first = FakeFwd::new();
    let server = serve_fake_fwd_until(s.dnsd.fwd_socket.clone(), first.clone(), stop.clone());
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    stop.cancel();
    server.await.unwrap();
    let second = FakeFwd::new();
    serve_fake_fwd(s.dnsd.fwd_socket.clone(), second.clone());
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::AAAA, false)).await;
    assert_eq!(
        resp.metadata.response_code,
        ResponseCode::NoError,
        "no reconnect"
    );
    assert_eq!(addrs(&resp), vec![ip("2001:db8::1")]);
    assert_eq!(first.calls().len(), 1);
    assert_eq!(second.calls().len(), 1);
}

#[tokio::test]
async fn slow_fwd_gives_servfail() {
    let s = setup(|_| {}).await;
    // fwd would answer after 30 s; authorize.timeout (500 ms) must end the wait long before.
    *s.fwd.mode.lock() = FwdMode::Delay(Duration::from_secs(30));
    let started = std::time::Instant::now();
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "authorize.timeout not applied"
    );
    // Not cached: once fwd is fast again the name resolves.
    *s.fwd.mode.lock() = FwdMode::Grant;
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
}

#[tokio::test]
async fn refusing_fwd_gives_servfail() {
    let s = setup(|_| {}).await;
    *s.fwd.mode.lock() = FwdMode::Refuse;
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::AAAA, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn rejected_addresses_are_removed_from_the_answer() {
    let s = setup(|_| {}).await;
    s.fwd.reject.lock().insert(ip("192.0.2.2"));
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&resp), vec![ip("192.0.2.1")]);
}

#[tokio::test]
async fn cache_hit_with_live_grant_does_not_call_fwd() {
    let s = setup(|_| {}).await;
    let first = udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    let second = udp_query(s.dnsd.udp, &query("EXAMPLE.com.", RecordType::A, false)).await;
    let third = tcp_query(s.dnsd.tcp, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(addrs(&first), addrs(&second));
    assert_eq!(addrs(&first), addrs(&third));
    assert_eq!(s.fwd.calls().len(), 1, "cache hits touched fwd");
    assert_eq!(s.upstream.queries.load(Ordering::SeqCst), 1);
    assert!(second.answers[0].ttl <= 300);
}

#[tokio::test]
async fn cache_hit_for_a_client_without_grant_reauthorizes() {
    // Per-client grants: a cached answer granted to 127.0.0.1 does not open anything for
    // 127.0.0.2, so its cache hit must go through fwd first.
    let s = setup(|c| c.authorize.per_client = true).await;
    let q = query("example.com.", RecordType::A, false);
    udp_query_from(s.dnsd.udp, "127.0.0.1", &q, Duration::from_secs(3))
        .await
        .unwrap();
    let resp = udp_query_from(
        s.dnsd.udp,
        "127.0.0.2",
        &query("example.com.", RecordType::A, false),
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    assert_eq!(addrs(&resp).len(), 2);
    udp_query_from(
        s.dnsd.udp,
        "127.0.0.1",
        &query("example.com.", RecordType::A, false),
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    udp_query_from(
        s.dnsd.udp,
        "127.0.0.2",
        &query("example.com.", RecordType::A, false),
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    let calls = s.fwd.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1].reason, "cache-refresh");
    assert_eq!(calls[1].client, vec![127, 0, 0, 2]);
    assert_eq!(s.upstream.queries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn cache_hit_without_grant_reauthorizes_once_fwd_is_back() {
    // Fail-open mode answered and cached without a grant; the next hit must authorize.
    let s = setup_with(zone(), false, |c| {
        c.authorize.on_fwd_error = OnFwdError::Answer
    })
    .await;
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(addrs(&resp).len(), 2);
    let fwd = FakeFwd::new();
    serve_fake_fwd(s.dnsd.fwd_socket.clone(), fwd.clone());
    // Grants are trusted only once the revocation watch is back (it backs off meanwhile).
    wait_watch_up(&s.dnsd).await;
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(addrs(&resp).len(), 2);
    let calls = fwd.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].reason, "cache-refresh");
    // Now the grant is known: no further calls.
    udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(fwd.calls().len(), 1);
    assert_eq!(s.upstream.queries.load(Ordering::SeqCst), 1);
}

// === revocations ===

const WATCH_UP: &str = "dnsd_revocation_watch_up";
const REVOCATIONS: &str = "dnsd_revocations_total";

async fn wait_watch_up(d: &Dnsd) {
    wait_metric(d.metrics, WATCH_UP, |v| v == 1.0).await;
}

async fn wait_watch_down(d: &Dnsd) {
    wait_metric(d.metrics, WATCH_UP, |v| v == 0.0).await;
}

/// Pushes revocations through the fake fwd and waits until dnsd has applied them.
async fn revoke(s: &Setup, cidrs: &[&str]) {
    let before = metric(s.dnsd.metrics, REVOCATIONS).await.unwrap();
    for c in cidrs {
        s.fwd.revoke(c);
    }
    let want = before + cidrs.len() as f64;
    wait_metric(s.dnsd.metrics, REVOCATIONS, |v| v >= want).await;
}

async fn a_query(s: &Setup) -> hickory_proto::op::Message {
    udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await
}

/// Clients, and queries per client, of [`burst_from_clients`].
const BURST_CLIENTS: u16 = 6;
const BURST_EACH: u16 = 40;

/// Sends [`BURST_EACH`] queries from each of [`BURST_CLIENTS`] clients to `to` (query `i` of
/// client `c` made by `make(c, i)`, with ID `c * 1000 + i`), every one before any answer is
/// read, so that dnsd finds many queued at once. Then every client must get exactly one
/// NOERROR answer to each of its queries and nothing more; `check` looks at each answer.
async fn burst_from_clients(
    to: std::net::SocketAddr,
    make: impl Fn(u16, u16) -> hickory_proto::op::Message,
    check: impl Fn(&hickory_proto::op::Message),
) {
    let mut clients = Vec::new();
    for c in 0..BURST_CLIENTS {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(to).await.unwrap();
        clients.push((c, sock));
    }
    for i in 0..BURST_EACH {
        for (c, sock) in &clients {
            let mut q = make(*c, i);
            q.metadata.id = c * 1000 + i;
            sock.send(&q.to_vec().unwrap()).await.unwrap();
        }
    }
    for (c, sock) in &clients {
        let mut ids = Vec::new();
        let mut buf = vec![0u8; 65_535];
        while ids.len() < usize::from(BURST_EACH) {
            let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("client {c}: only {} answers", ids.len()))
                .unwrap();
            let resp = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
            check(&resp);
            ids.push(resp.metadata.id);
        }
        ids.sort_unstable();
        let want: Vec<u16> = (0..BURST_EACH).map(|i| c * 1000 + i).collect();
        assert_eq!(
            ids, want,
            "client {c} got another client's answers or duplicates"
        );
    }
    // Nothing beyond one answer per query: every answer was read above, so a second copy
    // of one would be queued by now.
    let mut buf = vec![0u8; 512];
    for (c, sock) in &clients {
        assert!(
            sock.try_recv(&mut buf).is_err(),
            "client {c} got more answers than it asked for"
        );
    }
}

/// Cache hits are answered in the receive loop and the answers of one read leave in one
/// `sendmmsg`: a burst from several clients at once must still bring every client exactly its
/// own answers.
#[tokio::test]
async fn a_burst_of_cache_hits_from_many_clients_brings_each_its_own_answers() {
    let s = setup(|_| {}).await;
    a_query(&s).await;
    let calls = s.fwd.calls().len();
    burst_from_clients(
        s.dnsd.udp,
        |_, i| query("example.com.", RecordType::A, i.is_multiple_of(2)),
        |resp| {
            assert_eq!(addrs(resp), vec![ip("192.0.2.1"), ip("192.0.2.2")]);
            // The answer echoes the EDNS choice of the query it answers.
            assert_eq!(
                resp.edns.is_some(),
                (resp.metadata.id % 1000).is_multiple_of(2)
            );
        },
    )
    .await;
    assert_eq!(
        s.fwd.calls().len(),
        calls,
        "hits with a live grant never call fwd"
    );
}

/// Answers to cache misses are finished by their query tasks and wait in the listener's outbox
/// for one `sendmmsg`: a burst of misses from several clients at once must still bring every
/// client exactly its own answers, each to the question it asked.
#[tokio::test]
async fn a_burst_of_cache_misses_from_many_clients_brings_each_its_own_answers() {
    burst_of_misses().await;
}

/// The same on two worker threads: misses finish on one worker while the listener drains its
/// outbox on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_cache_misses_on_two_workers_brings_each_client_its_own_answers() {
    burst_of_misses().await;
}

async fn burst_of_misses() {
    let burst: Responder = Arc::new(|q| {
        let name = q.queries[0].name().to_ascii();
        Some(reply(q, &[&format!("{name} 300 A 192.0.2.9")]))
    });
    let s = setup_with(burst, true, |_| {}).await;
    let name = |c: u16, i: u16| format!("c{c}q{i}.burst.test.");
    burst_from_clients(
        s.dnsd.udp,
        |c, i| query(&name(c, i), RecordType::A, false),
        |resp| {
            let id = resp.metadata.id;
            assert_eq!(
                resp.queries[0].name().to_ascii(),
                name(id / 1000, id % 1000),
                "the answer with ID {id} answers another question"
            );
            assert_eq!(addrs(resp), vec![ip("192.0.2.9")]);
        },
    )
    .await;
    assert_eq!(
        s.upstream
            .queries
            .load(std::sync::atomic::Ordering::Relaxed),
        usize::from(BURST_CLIENTS * BURST_EACH),
        "every query was a miss"
    );
}

/// A query in flight when shutdown starts still gets its answer: once the UDP listener has
/// stopped, its query tasks send their answers themselves.
#[tokio::test]
async fn a_miss_in_flight_at_shutdown_is_still_answered() {
    let s = setup(|_| {}).await;
    let q = query("example.com.", RecordType::A, false);
    let pending = query_held_by_fwd(&s, q, Duration::from_secs(10), "Authorize never called").await;
    s.dnsd.shutdown.cancel();
    // The listener stops at once; the query waits for fwd until it is released.
    tokio::task::yield_now().await;
    s.fwd.release.notify_one();
    let resp = pending
        .await
        .unwrap()
        .expect("the query in flight at shutdown got no answer");
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&resp), vec![ip("192.0.2.1"), ip("192.0.2.2")]);
    let res = tokio::time::timeout(Duration::from_secs(10), s.dnsd.task)
        .await
        .expect("shutdown hung")
        .unwrap();
    assert!(res.is_ok(), "{res:?}");
}

/// Regression test for the bug found by the end-to-end test of the same name: after an admin
/// revoked an address in fwd, dnsd kept serving the cached answer as if its grant were live.
#[tokio::test]
async fn cache_hit_after_revoke_handed_out_a_refused_address() {
    // fwd holds the refresh while the test checks that nothing was answered: a deadline far
    // above that window, so that a slow machine cannot turn it into SERVFAIL.
    let s = setup(|c| c.authorize.timeout = Duration::from_secs(10)).await;
    wait_watch_up(&s.dnsd).await;
    // The catch-alls of the new stream were applied.
    assert_eq!(metric(s.dnsd.metrics, REVOCATIONS).await, Some(2.0));
    a_query(&s).await;
    a_query(&s).await;
    assert_eq!(
        s.fwd.calls().len(),
        1,
        "a hit with a live grant touched fwd"
    );

    revoke(&s, &["192.0.2.2/32"]).await;
    // The next hit goes through fwd before it is answered.
    let q = query("example.com.", RecordType::A, false);
    let pending = query_held_by_fwd(
        &s,
        q,
        Duration::from_secs(5),
        "the hit after a revocation was served without Authorize",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished(), "answered before fwd confirmed");
    *s.fwd.hold.lock() = false;
    s.fwd.release.notify_one();
    let resp = pending.await.unwrap().expect("no answer");
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&resp), vec![ip("192.0.2.1"), ip("192.0.2.2")]);
    let calls = s.fwd.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].reason, "cache-refresh");
    assert_eq!(grant_ips(&calls[1]), vec![ip("192.0.2.1"), ip("192.0.2.2")]);
    // The DNS data stayed cached, and the new grant is trusted again.
    a_query(&s).await;
    assert_eq!(s.fwd.calls().len(), 2);
    assert_eq!(s.upstream.queries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unrelated_revocation_keeps_cached_grants() {
    let s = setup(|_| {}).await;
    wait_watch_up(&s.dnsd).await;
    a_query(&s).await;
    revoke(&s, &["192.0.2.3/32", "198.51.100.0/24", "2001:db8::/32"]).await;
    a_query(&s).await;
    assert_eq!(
        s.fwd.calls().len(),
        1,
        "an unrelated revocation forced Authorize"
    );
    // A covering network does.
    revoke(&s, &["192.0.2.0/24"]).await;
    a_query(&s).await;
    assert_eq!(s.fwd.calls().len(), 2);
}

#[tokio::test]
async fn revocation_covers_every_client_in_per_client_mode() {
    let s = setup(|c| c.authorize.per_client = true).await;
    wait_watch_up(&s.dnsd).await;
    let ask = |from: &'static str| {
        let udp = s.dnsd.udp;
        async move {
            udp_query_from(
                udp,
                from,
                &query("example.com.", RecordType::A, false),
                Duration::from_secs(3),
            )
            .await
            .unwrap()
        }
    };
    ask("127.0.0.1").await;
    ask("127.0.0.2").await;
    ask("127.0.0.1").await;
    ask("127.0.0.2").await;
    assert_eq!(s.fwd.calls().len(), 2);
    revoke(&s, &["192.0.2.1/32"]).await;
    ask("127.0.0.1").await;
    ask("127.0.0.2").await;
    let calls = s.fwd.calls();
    assert_eq!(calls.len(), 4, "{calls:?}");
    let mut clients: Vec<Vec<u8>> = calls[2..].iter().map(|c| c.client.clone()).collect();
    clients.sort();
    assert_eq!(clients, vec![vec![127, 0, 0, 1], vec![127, 0, 0, 2]]);
    assert!(calls[2..].iter().all(|c| c.reason == "cache-refresh"));
}

#[tokio::test]
async fn cache_hits_reauthorize_while_the_revocation_watch_is_down() {
    let s = setup(|_| {}).await;
    wait_watch_up(&s.dnsd).await;
    a_query(&s).await;
    a_query(&s).await;
    assert_eq!(s.fwd.calls().len(), 1);

    // The stream ends and fwd refuses to resubscribe: revocations could be missed, so every
    // A/AAAA hit asks fwd, however fresh its grant.
    *s.fwd.refuse_watch.lock() = true;
    s.fwd.cut_watchers();
    wait_watch_down(&s.dnsd).await;
    for n in 2..=3 {
        let resp = a_query(&s).await;
        assert_eq!(addrs(&resp).len(), 2);
        assert_eq!(s.fwd.calls().len(), n);
    }
    // Non-address answers never need fwd.
    udp_query(s.dnsd.udp, &query("example.com.", RecordType::TXT, false)).await;
    udp_query(s.dnsd.udp, &query("example.com.", RecordType::TXT, false)).await;
    assert_eq!(s.fwd.calls().len(), 3);

    // Reconnected: the catch-alls forget what was learned meanwhile, once.
    let watchers = s.fwd.watchers.load(Ordering::SeqCst);
    *s.fwd.refuse_watch.lock() = false;
    wait_watch_up(&s.dnsd).await;
    assert_eq!(s.fwd.watchers.load(Ordering::SeqCst), watchers + 1);
    a_query(&s).await;
    a_query(&s).await;
    assert_eq!(s.fwd.calls().len(), 4);
    assert_eq!(s.upstream.queries.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn cache_hit_fails_closed_when_fwd_answers_badly_while_the_watch_is_down() {
    // fwd is there but cannot confirm: it may have revoked the address unseen, so SERVFAIL.
    let s = setup(|_| {}).await;
    a_query(&s).await;
    *s.fwd.refuse_watch.lock() = true;
    s.fwd.cut_watchers();
    wait_watch_down(&s.dnsd).await;
    *s.fwd.mode.lock() = FwdMode::Refuse;
    let resp = a_query(&s).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
    assert!(resp.answers.is_empty());
    *s.fwd.mode.lock() = FwdMode::Delay(Duration::from_secs(2));
    let resp = a_query(&s).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn cache_hit_while_fwd_is_dead_is_served_under_its_committed_grant() {
    // A dead fwd revokes nothing, and the kernel element it committed lives on its own
    // timeout: the cached answer is still reachable (fresh answers fail closed).
    let s = setup_with(zone(), false, |_| {}).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let server = serve_fake_fwd_until(s.dnsd.fwd_socket.clone(), s.fwd.clone(), stop.clone());
    wait_watch_up(&s.dnsd).await;
    a_query(&s).await;
    assert_eq!(s.fwd.calls().len(), 1);
    stop.cancel();
    server.await.unwrap();
    wait_watch_down(&s.dnsd).await;
    let resp = a_query(&s).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&resp).len(), 2);
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::AAAA, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);

    // fwd is back (it may have revoked on its way down or at start): the catch-alls forget
    // the old grant, so the next hit asks the new fwd once.
    let back = FakeFwd::new();
    serve_fake_fwd(s.dnsd.fwd_socket.clone(), back.clone());
    wait_watch_up(&s.dnsd).await;
    a_query(&s).await;
    a_query(&s).await;
    let calls = back.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].reason, "cache-refresh");
}

#[tokio::test]
async fn only_the_cname_chain_is_authorized_with_its_minimum_ttl() {
    let s = setup(|_| {}).await;
    let resp = udp_query(s.dnsd.udp, &query("www.example.com.", RecordType::A, false)).await;
    assert_eq!(
        addrs(&resp),
        vec![ip("198.51.100.7")],
        "off-chain record served"
    );
    let calls = s.fwd.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(grant_ips(&calls[0]), vec![ip("198.51.100.7")]);
    assert_eq!(calls[0].grants[0].ttl_s, 60, "minimum TTL along the chain");
    assert!(resp.answers.iter().all(|r| r.ttl <= 60));
}

#[tokio::test]
async fn sinkhole_and_non_address_answers_do_not_touch_fwd() {
    let s = setup(|_| {}).await;
    let resp = udp_query(s.dnsd.udp, &query("sinkhole.test.", RecordType::A, false)).await;
    assert_eq!(addrs(&resp), vec![ip("0.0.0.0")]);
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::TXT, false)).await;
    assert_eq!(resp.answers.len(), 1);
    let resp = udp_query(s.dnsd.udp, &query("nothing.test.", RecordType::A, false)).await;
    assert!(resp.answers.is_empty());
    assert!(s.fwd.calls().is_empty());
}

#[tokio::test]
async fn unparseable_upstream_answer_is_servfail_and_authorizes_nothing() {
    let s = setup(|_| {}).await;
    let resp = udp_query(s.dnsd.udp, &query("garbage.test.", RecordType::A, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
    assert!(s.fwd.calls().is_empty());
}

#[tokio::test]
async fn large_answers_are_truncated_over_udp_and_whole_over_tcp() {
    let s = setup(|_| {}).await;
    let resp = udp_query(s.dnsd.udp, &query("big.test.", RecordType::TXT, false)).await;
    assert!(
        resp.metadata.truncation,
        "no TC for a >512 byte answer to a non-EDNS client"
    );
    assert!(resp.answers.is_empty());
    let resp = udp_query(s.dnsd.udp, &query("big.test.", RecordType::TXT, true)).await;
    assert!(!resp.metadata.truncation, "fits the client's EDNS size");
    let resp = tcp_query(s.dnsd.tcp, &query("big.test.", RecordType::TXT, false)).await;
    assert!(!resp.metadata.truncation);
    assert_eq!(resp.answers.len(), 15);
}

#[tokio::test]
async fn domain_policy_blocks_before_upstream() {
    let s = setup(|c| {
        c.domains.mode = dnsd::config::DomainMode::Deny;
        c.domains.names = vec!["*.example.com".into()];
    })
    .await;
    let resp = udp_query(s.dnsd.udp, &query("www.example.com.", RecordType::A, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(s.upstream.queries.load(Ordering::SeqCst), 0);
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
}

#[tokio::test]
async fn acl_refuses_or_drops() {
    let s = setup(|c| c.acl.allow = vec!["127.0.0.2/32".parse().unwrap()]).await;
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::Refused);
    let ok = udp_query_from(
        s.dnsd.udp,
        "127.0.0.2",
        &query("example.com.", RecordType::A, false),
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    assert_eq!(ok.metadata.response_code, ResponseCode::NoError);

    let s = setup(|c| {
        c.acl.allow = vec!["127.0.0.2/32".parse().unwrap()];
        c.acl.action = dnsd::config::AclAction::Drop;
    })
    .await;
    let none = udp_query_from(
        s.dnsd.udp,
        "127.0.0.1",
        &query("example.com.", RecordType::A, false),
        Duration::from_millis(500),
    )
    .await;
    assert!(none.is_none());
}

#[tokio::test]
async fn malformed_packets_leave_dnsd_serving() {
    use tokio::io::AsyncWriteExt;
    let s = setup(|_| {}).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Header-less junk is dropped; a parseable header gets FORMERR.
    for junk in [vec![], vec![1u8], vec![0xffu8; 11], vec![0x42u8; 65_000]] {
        sock.send_to(&junk, s.dnsd.udp).await.unwrap();
    }
    let mut hdr = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    hdr.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]); // compression loop
    sock.send_to(&hdr, s.dnsd.udp).await.unwrap();
    // (The 0x42 junk has a parseable header with an unknown opcode: it gets NOTIMP.)
    let mut buf = [0u8; 512];
    let resp = loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let resp = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
        if resp.metadata.id == 0xabcd {
            break resp;
        }
        assert_eq!(resp.metadata.response_code, ResponseCode::NotImp);
    };
    assert_eq!(resp.metadata.response_code, ResponseCode::FormErr);

    // TCP: a lying length then close, a zero length, and a slow writer.
    let mut t = tokio::net::TcpStream::connect(s.dnsd.tcp).await.unwrap();
    t.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
    drop(t);
    let mut t = tokio::net::TcpStream::connect(s.dnsd.tcp).await.unwrap();
    t.write_all(&[0, 0]).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(s.dnsd.tcp).await.unwrap();
    slow.write_all(&[0]).await.unwrap();

    // Still serving, over both transports, with pipelined TCP queries.
    let resp = udp_query(s.dnsd.udp, &query("example.com.", RecordType::TXT, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    let mut t = tokio::net::TcpStream::connect(s.dnsd.tcp).await.unwrap();
    let q1 = query("example.com.", RecordType::TXT, false);
    let q2 = query("example.com.", RecordType::A, false);
    for q in [&q1, &q2] {
        let wire = q.to_vec().unwrap();
        let mut frame = (wire.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(&wire);
        t.write_all(&frame).await.unwrap();
    }
    let a = read_frame(&mut t).await.unwrap();
    let b = read_frame(&mut t).await.unwrap();
    let mut ids = [a.metadata.id, b.metadata.id];
    ids.sort_unstable();
    let mut want = [q1.metadata.id, q2.metadata.id];
    want.sort_unstable();
    assert_eq!(ids, want);
}

#[tokio::test]
async fn control_socket_stats_and_flush() {
    use guard_proto::v1::resolver_client::ResolverClient;
    use guard_proto::v1::{FlushCacheRequest, StatsRequest, UpstreamsRequest};
    let s = setup(|_| {}).await;
    udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
    let ch = guard_proto::connect_unix(&s.dnsd.control).await.unwrap();
    let mut c = ResolverClient::new(ch);
    let stats = c.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.api_version, "guard.v1");
    assert_eq!(stats.queries, 2);
    assert_eq!(stats.cache_hits, 1);
    assert_eq!(stats.authorize_calls, 1);
    assert_eq!(stats.cache_entries, 1);
    let ups = c.upstreams(UpstreamsRequest {}).await.unwrap().into_inner();
    assert_eq!(ups.strategy, "failover");
    assert_eq!(ups.upstreams.len(), 1);
    // The test runs as root (uid 0 is admin by default) or as the socket owner (reader).
    let flush = c
        .flush_cache(FlushCacheRequest { name: "com".into() })
        .await;
    if nix::unistd::geteuid().is_root() {
        assert_eq!(flush.unwrap().into_inner().flushed, 1);
        udp_query(s.dnsd.udp, &query("example.com.", RecordType::A, false)).await;
        assert_eq!(s.upstream.queries.load(Ordering::SeqCst), 2);
    } else {
        assert_eq!(flush.unwrap_err().code(), tonic::Code::PermissionDenied);
    }
    let mode = std::fs::metadata(&s.dnsd.control).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o660);
}

#[tokio::test]
async fn shutdown_is_clean_and_removes_the_control_socket() {
    let s = setup(|_| {}).await;
    udp_query(s.dnsd.udp, &query("example.com.", RecordType::TXT, false)).await;
    s.dnsd.shutdown.cancel();
    let res = tokio::time::timeout(Duration::from_secs(10), s.dnsd.task)
        .await
        .expect("shutdown hung")
        .unwrap();
    assert!(res.is_ok(), "{res:?}");
    assert!(!s.dnsd.control.exists());
}
