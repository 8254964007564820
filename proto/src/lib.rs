//! The guard control protocol (`guard.v1`): generated gRPC types plus Unix-socket plumbing shared by all three binaries.
#![forbid(unsafe_code)]

/// Generated messages and services of `guard.v1`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("guard.v1");
}

/// The protocol version string every Status/Stats reply carries.
pub const API_VERSION: &str = "guard.v1";

mod channel;
mod gather;
mod unix_io;

/// Test helpers for the crates that use this one (feature `test-util`).
#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub mod test_util;

pub use channel::UnixChannel;
pub use unix_io::register_with_interest;

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// Opens a gRPC channel to a daemon listening on the Unix socket at `path`.
///
/// The URI is a placeholder: tonic needs one, the connector ignores it.
pub async fn connect_unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_path_buf();
    Endpoint::from_static("http://guard.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
}

/// Converts 4 or 16 raw bytes into an address; anything else is `None`.
pub fn ip_from_bytes(b: &[u8]) -> Option<std::net::IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

/// The raw network-order bytes of an address, as the hot path carries them.
pub fn ip_to_bytes(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_bytes_round_trip() {
        for s in ["192.0.2.1", "2001:db8::1"] {
            let ip: std::net::IpAddr = s.parse().unwrap();
            assert_eq!(ip_from_bytes(&ip_to_bytes(ip)), Some(ip));
        }
        assert_eq!(ip_from_bytes(&[1, 2, 3]), None);
        assert_eq!(ip_from_bytes(&[]), None);
    }
}
