//! fwd: the only privileged process of guard. It owns the `inet guard` nftables table and commits DNS-derived grants.
#![deny(unsafe_code)]

pub mod model;
pub mod store;
#[allow(unsafe_code)]
pub mod sys;
