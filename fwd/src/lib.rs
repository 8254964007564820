//! fwd: the only privileged process of guard. It owns the `inet guard` nftables table and commits DNS-derived grants.
#![deny(unsafe_code)]

pub mod command;
pub mod config;
pub mod engine;
pub mod listener;
pub mod logging;
pub mod model;
pub mod nft;
pub mod privdrop;
pub mod rpc;
pub mod server;
pub mod store;
#[allow(unsafe_code)]
pub mod sys;
