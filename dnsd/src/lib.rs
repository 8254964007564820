//! dnsd: guard's unprivileged DNS forwarder. Every A/AAAA answer is authorized in the kernel through fwd before it is released.
#![forbid(unsafe_code)]

pub mod answer;
pub mod authorize;
mod batch;
pub mod cache;
pub mod config;
pub mod control;
pub mod forward;
pub mod handler;
pub mod listener;
pub mod metrics;
pub mod policy;
mod quiet;
pub mod revocations;
pub mod server;
pub mod upstream;
pub mod wire;

pub use config::Config;
pub use listener::Sockets;
pub use server::run;
