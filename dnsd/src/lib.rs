//! dnsd: guard's unprivileged DNS forwarder. Every A/AAAA answer is authorized in the kernel through fwd before it is released.
#![forbid(unsafe_code)]

pub mod upstream;
