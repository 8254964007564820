//! Connections to fwd and dnsd over their Unix sockets, and the mapping of their failures to
//! messages that say what to do.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::anyhow;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::format::sanitize;

/// Which daemon a request goes to; names it in every message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Daemon {
    /// The privileged firewall daemon (`Firewall` service).
    Fwd,
    /// The DNS resolver (`Resolver` service).
    Dnsd,
}

impl Daemon {
    /// The systemd unit / program a user should check when it cannot be reached.
    fn unit(self) -> &'static str {
        match self {
            Daemon::Fwd => "guard-fwd",
            Daemon::Dnsd => "guard-dnsd",
        }
    }
}

impl fmt::Display for Daemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Daemon::Fwd => "fwd",
            Daemon::Dnsd => "dnsd",
        })
    }
}

/// Opens a channel to `daemon` at `path`, failing with a message that names the socket and the
/// likely fix (daemon not running, caller not in the socket's group).
pub async fn connect(daemon: Daemon, path: &Path, timeout: Duration) -> anyhow::Result<Channel> {
    match tokio::time::timeout(timeout, guard_proto::connect_unix(path)).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(err)) => Err(connect_error(daemon, path, &err)),
        Err(_) => Err(anyhow!(
            "{daemon} at {} did not accept the connection within {}",
            path.display(),
            humantime::format_duration(timeout)
        )),
    }
}

/// Awaits one RPC with a deadline and maps a gRPC status to a message naming `daemon`.
pub async fn call<T>(
    daemon: Daemon,
    timeout: Duration,
    rpc: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(timeout, rpc).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status_error(daemon, &status)),
        Err(_) => Err(anyhow!(
            "{daemon} did not answer within {} (is {} overloaded or stuck?)",
            humantime::format_duration(timeout),
            daemon.unit()
        )),
    }
}

/// Maps a connection failure to a message, looking through tonic's wrapping for the I/O error.
fn connect_error(daemon: Daemon, path: &Path, err: &(dyn StdError + 'static)) -> anyhow::Error {
    let mut io_err = None;
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            io_err = Some(io);
            break;
        }
        cur = e.source();
    }
    match io_err {
        Some(io) if io.kind() == io::ErrorKind::PermissionDenied => {
            anyhow::Error::msg(socket_permission_message(daemon, path, io))
        }
        Some(io) => anyhow!(
            "cannot reach {daemon} at {}: {io} (is {} running?)",
            path.display(),
            daemon.unit()
        ),
        None => anyhow!(
            "cannot reach {daemon} at {}: {} (is {} running?)",
            path.display(),
            chain(err),
            daemon.unit()
        ),
    }
}

/// Explains an EACCES on connect: the socket (or a directory above it) belongs to a group the
/// caller is not in. Names that group so the fix is one `usermod` away.
pub(crate) fn socket_permission_message(daemon: Daemon, path: &Path, io: &io::Error) -> String {
    let mut msg = format!(
        "permission denied connecting to {daemon} at {}: {io}; ",
        path.display()
    );
    // The socket itself, or the first ancestor we may stat when a directory blocks the way.
    let found = path
        .ancestors()
        .find_map(|p| std::fs::metadata(p).ok().map(|md| (p, md)));
    match found {
        Some((p, md)) => {
            let group = group_name(md.gid());
            let what = if p == path { "socket" } else { "directory" };
            msg.push_str(&format!(
                "the caller needs to be in the socket's group '{group}' \
                 ({what} {} is mode {:04o}, owner {}:{group}); \
                 add the user with `usermod -aG {group} USER` and log in again, or run as root",
                p.display(),
                md.permissions().mode() & 0o7777,
                user_name(md.uid()),
            ));
        }
        None => msg.push_str(
            "the caller needs to be in the socket's group (see `ls -l` on the socket and its \
             directory), or run as root",
        ),
    }
    msg
}

fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name,
        _ => uid.to_string(),
    }
}

fn group_name(gid: u32) -> String {
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(g)) => g.name,
        _ => gid.to_string(),
    }
}

/// Maps a gRPC status from `daemon` to the message the user sees.
pub(crate) fn status_error(daemon: Daemon, status: &Status) -> anyhow::Error {
    let message = if status.message().is_empty() {
        status.code().description().to_owned()
    } else {
        sanitize(status.message()).into_owned()
    };
    let unit = daemon.unit();
    match status.code() {
        Code::PermissionDenied => anyhow!("permission denied by {daemon}: {message}"),
        Code::InvalidArgument => anyhow!("{daemon} rejected the request: {message}"),
        Code::Unavailable => anyhow!("{daemon} is unavailable: {message} (is {unit} running?)"),
        Code::Unimplemented => anyhow!(
            "{daemon} does not implement this request: {message} \
             (are guardctl and {unit} the same version?)"
        ),
        code => anyhow!("{daemon} failed the request ({code:?}): {message}"),
    }
}

/// An error and its sources joined with ": ", for errors we do not wrap in anyhow.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        // tonic and hyper often repeat the inner message in the outer one.
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn status_codes_map_to_messages() {
        let e = status_error(
            Daemon::Fwd,
            &Status::permission_denied("uid 1000 is not admin"),
        );
        assert_eq!(
            e.to_string(),
            "permission denied by fwd: uid 1000 is not admin"
        );
        let e = status_error(Daemon::Fwd, &Status::invalid_argument("bad cidr"));
        assert_eq!(e.to_string(), "fwd rejected the request: bad cidr");
        let e = status_error(Daemon::Dnsd, &Status::unavailable("gone"));
        assert_eq!(
            e.to_string(),
            "dnsd is unavailable: gone (is guard-dnsd running?)"
        );
        let e = status_error(Daemon::Fwd, &Status::unimplemented(""));
        assert!(
            e.to_string()
                .starts_with("fwd does not implement this request: ")
        );
        let e = status_error(Daemon::Fwd, &Status::internal("db locked"));
        assert_eq!(
            e.to_string(),
            "fwd failed the request (Internal): db locked"
        );
    }

    #[test]
    fn server_messages_are_sanitized() {
        let e = status_error(Daemon::Fwd, &Status::permission_denied("x\u{1b}[2Jy"));
        assert_eq!(e.to_string(), "permission denied by fwd: x\\u{1b}[2Jy");
    }

    #[test]
    fn io_errors_are_found_inside_wrappers() {
        #[derive(Debug)]
        struct Wrapper(io::Error);
        impl fmt::Display for Wrapper {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("transport error")
            }
        }
        impl StdError for Wrapper {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let path = Path::new("/nonexistent/fwd.sock");
        let err = Wrapper(io::Error::from(io::ErrorKind::NotFound));
        let msg = connect_error(Daemon::Fwd, path, &err).to_string();
        assert!(
            msg.starts_with("cannot reach fwd at /nonexistent/fwd.sock: "),
            "{msg}"
        );
        assert!(msg.ends_with("(is guard-fwd running?)"), "{msg}");

        let err = Wrapper(io::Error::from_raw_os_error(13));
        let msg = connect_error(Daemon::Fwd, path, &err).to_string();
        assert!(
            msg.starts_with("permission denied connecting to fwd at "),
            "{msg}"
        );
        // "/" is the first ancestor that exists; it is owned by some group.
        assert!(
            msg.contains("the caller needs to be in the socket's group '"),
            "{msg}"
        );
        assert!(msg.contains("directory / is mode"), "{msg}");
    }

    #[test]
    fn permission_message_names_the_socket_group() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fwd.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660)).unwrap();
        let io = io::Error::from_raw_os_error(13);
        let msg = socket_permission_message(Daemon::Fwd, &sock, &io);
        let gid = std::fs::metadata(&sock).unwrap().gid();
        let group = group_name(gid);
        assert!(
            msg.contains(&format!("needs to be in the socket's group '{group}'")),
            "{msg}"
        );
        assert!(msg.contains("is mode 0660"), "{msg}");
        assert!(msg.contains(&format!("usermod -aG {group} USER")), "{msg}");
    }
}
