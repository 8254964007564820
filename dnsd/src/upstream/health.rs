//! Per-upstream health: counters, smoothed RTT and the back-off of a down upstream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// A snapshot of one upstream's health. The first seven fields mirror
/// `guard.v1.UpstreamHealth`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamHealth {
    /// The upstream as a normalized URL, e.g. `tls://192.0.2.53:853#dns.example`.
    pub url: String,
    /// False while the upstream is marked down (backing off after consecutive failures).
    pub healthy: bool,
    /// Smoothed RTT in microseconds (0: no sample yet).
    pub srtt_us: u64,
    /// Attempts sent to this upstream (client queries and health probes).
    pub queries: u64,
    /// Failed attempts plus malformed or mismatched responses received.
    pub errors: u64,
    /// Open pooled TCP/TLS connections (for udp://, those of its TCP fallback).
    pub open_connections: u32,
    /// The last error, empty if none yet.
    pub last_error: String,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// TLS handshakes that were full (no session resumed).
    pub tls_handshakes_full: u64,
    /// TLS handshakes that resumed an earlier session.
    pub tls_handshakes_resumed: u64,
}

/// Whether an upstream may carry a client query now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Healthy.
    Up,
    /// Down, and its back-off has ended: ready to be probed.
    Retry,
    /// Down and backing off.
    Down,
}

/// Back-off and failure policy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub(crate) max_failures: u32,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
}

#[derive(Debug)]
struct Inner {
    srtt_us: u64,
    consecutive_failures: u32,
    down_until: Option<Instant>,
    backoff: Duration,
    last_error: String,
    probing: bool,
}

/// Health of one upstream; shared by all queries.
#[derive(Debug)]
pub(crate) struct Health {
    policy: Policy,
    queries: AtomicU64,
    errors: AtomicU64,
    inner: Mutex<Inner>,
}

/// The EWMA weight of a new sample, as unbound's srtt: srtt += (rtt - srtt) / 8.
const SRTT_GAIN: i64 = 8;

impl Health {
    pub(crate) fn new(policy: Policy) -> Self {
        Self {
            policy,
            queries: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                srtt_us: 0,
                consecutive_failures: 0,
                down_until: None,
                backoff: policy.backoff_initial,
                last_error: String::new(),
                probing: false,
            }),
        }
    }

    pub(crate) fn state(&self, now: Instant) -> State {
        match self.inner.lock().down_until {
            None => State::Up,
            Some(t) if now >= t => State::Retry,
            Some(_) => State::Down,
        }
    }

    /// Smoothed RTT in microseconds, 0 when unknown.
    pub(crate) fn srtt_us(&self) -> u64 {
        self.inner.lock().srtt_us
    }

    /// An attempt is being sent.
    pub(crate) fn on_attempt(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
    }

    /// A response was received after `rtt`.
    pub(crate) fn on_success(&self, rtt: Duration) {
        let mut g = self.inner.lock();
        update_srtt(&mut g.srtt_us, rtt);
        g.consecutive_failures = 0;
        if g.down_until.take().is_some() {
            tracing::info!("upstream is healthy again");
        }
        g.backoff = self.policy.backoff_initial;
    }

    /// An attempt failed. `timed_out` with the attempt's timeout penalizes the srtt as unbound
    /// does, so `fastest` stops preferring an upstream that does not answer.
    pub(crate) fn on_failure(&self, error: &str, timed_out: Option<Duration>, now: Instant) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut g = self.inner.lock();
        if let Some(t) = timed_out {
            update_srtt(&mut g.srtt_us, t);
        }
        g.last_error = error.to_owned();
        g.consecutive_failures = g.consecutive_failures.saturating_add(1);
        if g.consecutive_failures >= self.policy.max_failures {
            let backoff = g.backoff;
            g.down_until = Some(now + backoff);
            g.backoff = (backoff * 2).min(self.policy.backoff_max);
            tracing::warn!(
                failures = g.consecutive_failures,
                backoff = %humantime::format_duration(backoff),
                error,
                "upstream marked down"
            );
        }
    }

    /// A malformed or mismatched response arrived (it does not end the attempt).
    pub(crate) fn on_bad_response(&self, reason: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.inner.lock().last_error = reason.to_owned();
    }

    /// Claims the right to run the one health probe of a down upstream.
    pub(crate) fn start_probe(&self) -> bool {
        let mut g = self.inner.lock();
        !std::mem::replace(&mut g.probing, true)
    }

    pub(crate) fn end_probe(&self) {
        self.inner.lock().probing = false;
    }

    pub(crate) fn snapshot(&self, url: String, open_connections: u32) -> UpstreamHealth {
        let g = self.inner.lock();
        UpstreamHealth {
            url,
            healthy: g.down_until.is_none(),
            srtt_us: g.srtt_us,
            queries: self.queries.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            open_connections,
            last_error: g.last_error.clone(),
            consecutive_failures: g.consecutive_failures,
            tls_handshakes_full: 0,
            tls_handshakes_resumed: 0,
        }
    }
}

fn update_srtt(srtt_us: &mut u64, rtt: Duration) {
    let sample = i64::try_from(rtt.as_micros())
        .unwrap_or(i64::MAX / 2)
        .max(1);
    if *srtt_us == 0 {
        *srtt_us = sample.unsigned_abs();
        return;
    }
    let old = i64::try_from(*srtt_us).unwrap_or(i64::MAX / 2);
    *srtt_us = (old + (sample - old) / SRTT_GAIN).max(1).unsigned_abs();
}

#[cfg(test)]
mod tests {
    use super::super::testutil::policy;
    use super::*;

    #[test]
    fn srtt_is_an_ewma() {
        let h = Health::new(policy());
        h.on_success(Duration::from_millis(80));
        assert_eq!(h.srtt_us(), 80_000);
        h.on_success(Duration::from_millis(40));
        assert_eq!(h.srtt_us(), 75_000);
        for _ in 0..100 {
            h.on_success(Duration::from_millis(10));
        }
        assert!((10_000..10_100).contains(&h.srtt_us()), "{}", h.srtt_us());
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_cap_and_resets_on_success() {
        let h = Health::new(policy());
        let t0 = Instant::now();
        h.on_failure("x", None, t0);
        h.on_failure("x", None, t0);
        assert_eq!(h.state(t0), State::Up);
        h.on_failure("refused", None, t0);
        assert_eq!(h.state(t0), State::Down);
        assert_eq!(h.state(t0 + Duration::from_millis(999)), State::Down);
        assert_eq!(h.state(t0 + Duration::from_secs(1)), State::Retry);
        let mut expect = 2;
        let mut now = t0 + Duration::from_secs(1);
        for _ in 0..10 {
            h.on_failure("again", None, now);
            assert_eq!(
                h.state(now + Duration::from_secs(expect) - Duration::from_millis(1)),
                State::Down
            );
            assert_eq!(h.state(now + Duration::from_secs(expect)), State::Retry);
            now += Duration::from_secs(expect);
            expect = (expect * 2).min(60);
        }
        let snap = h.snapshot("udp://x".into(), 0);
        assert!(!snap.healthy);
        assert_eq!(snap.errors, 13);
        assert_eq!(snap.last_error, "again");
        h.on_success(Duration::from_millis(5));
        assert_eq!(h.state(now), State::Up);
        h.on_failure("x", None, now);
        h.on_failure("x", None, now);
        h.on_failure("x", None, now);
        assert_eq!(
            h.state(now + Duration::from_secs(1)),
            State::Retry,
            "back-off was reset"
        );
    }

    #[test]
    fn one_probe_at_a_time() {
        let h = Health::new(policy());
        assert!(h.start_probe());
        assert!(!h.start_probe());
        h.end_probe();
        assert!(h.start_probe());
    }
}
