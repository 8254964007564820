//! fwd: the only privileged process of guard. It owns the `inet guard` nftables table and commits DNS-derived grants.
#![deny(unsafe_code)]

pub mod command;
pub mod config;
pub mod model;
pub mod nft;
pub mod store;
#[allow(unsafe_code)]
pub mod sys;
pub mod engine;
pub mod privdrop;
pub mod rpc;
pub mod server;
pub mod listener;
pub mod logging;
