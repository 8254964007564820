//! The harness's error type, and `OrFail`, which turns any failure into a test failure at the caller's line.

use std::fmt;

/// Why a harness operation failed. The message carries its context (command, namespace, path, log tail).
pub struct Error {
    msg: String,
}

/// Results of harness operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with this message.
    pub fn msg(msg: impl Into<String>) -> Self {
        Self { msg: msg.into() }
    }

    /// This error with `what` prepended, so the message reads outermost first.
    #[must_use]
    pub fn context(self, what: impl fmt::Display) -> Self {
        Self {
            msg: format!("{what}: {}", self.msg),
        }
    }
}

// Debug prints the message plainly: a test returning `Err` shows it as is.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::msg(e.to_string())
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Self::msg(format!("gRPC status {:?}: {}", s.code(), s.message()))
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Self {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        Self::msg(msg)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Self::msg(format!("JSON: {e}"))
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Self::msg(e.to_string())
    }
}

/// Adds context to a fallible harness result.
pub trait Context<T> {
    /// On error, prepend `what` to the message.
    fn context(self, what: impl fmt::Display) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(what))
    }
}

/// Turns a failure into a test failure (a panic at the caller's line), so that the harness's
/// Drop guards see `std::thread::panicking()` and print the daemons' logs.
pub trait OrFail<T> {
    /// The value, or a test failure naming `what` and the error.
    fn or_fail(self, what: &str) -> T;
}

impl<T, E: fmt::Display> OrFail<T> for std::result::Result<T, E> {
    #[track_caller]
    #[allow(clippy::panic)] // failing the test is the point
    fn or_fail(self, what: &str) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

impl<T> OrFail<T> for Option<T> {
    #[track_caller]
    #[allow(clippy::panic)] // failing the test is the point
    fn or_fail(self, what: &str) -> T {
        match self {
            Some(v) => v,
            None => panic!("{what}: nothing found"),
        }
    }
}
