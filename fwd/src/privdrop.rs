//! Privilege drop: keep only CAP_NET_ADMIN (also ambient, so the `nft` children fwd execs keep it), set no_new_privs.
//!
//! Must run before the tokio runtime starts: capabilities and credentials are per thread.

use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Uid, User};

/// Why privileges could not be dropped, or are insufficient.
#[derive(Debug, thiserror::Error)]
pub enum PrivError {
    /// The configured user does not exist.
    #[error("user {0:?} does not exist")]
    NoUser(String),
    /// A capability operation failed.
    #[error("capabilities ({what}): {source}")]
    Caps {
        /// Which step.
        what: &'static str,
        /// The error.
        source: caps::errors::CapsError,
    },
    /// A credential syscall failed.
    #[error("{what}: {source}")]
    Sys {
        /// Which step.
        what: &'static str,
        /// The errno.
        source: nix::Error,
    },
    /// Started without root and without CAP_NET_ADMIN.
    #[error(
        "fwd needs CAP_NET_ADMIN: run it as root, or give it AmbientCapabilities=CAP_NET_ADMIN"
    )]
    Missing,
}

fn c(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> PrivError {
    move |source| PrivError::Caps { what, source }
}
fn s(what: &'static str) -> impl FnOnce(nix::Error) -> PrivError {
    move |source| PrivError::Sys { what, source }
}

/// Drops to `user` (if non-empty and we are root) keeping only CAP_NET_ADMIN. Returns a
/// description of the resulting credentials for the log.
pub fn drop_privileges(user: &str) -> Result<String, PrivError> {
    let only: CapsHashSet = [Capability::CAP_NET_ADMIN].into_iter().collect();
    if !Uid::effective().is_root() {
        // Non-root (systemd with AmbientCapabilities): make sure the capability is effective.
        let permitted = caps::read(None, CapSet::Permitted).map_err(c("read permitted"))?;
        if !permitted.contains(&Capability::CAP_NET_ADMIN) {
            return Err(PrivError::Missing);
        }
        caps::set(None, CapSet::Inheritable, &only).map_err(c("set inheritable"))?;
        caps::set(None, CapSet::Effective, &only).map_err(c("set effective"))?;
        caps::raise(None, CapSet::Ambient, Capability::CAP_NET_ADMIN)
            .map_err(c("raise ambient"))?;
        caps::set(None, CapSet::Permitted, &only).map_err(c("set permitted"))?;
        nix::sys::prctl::set_no_new_privs().map_err(s("no_new_privs"))?;
        return Ok(format!("uid {} with CAP_NET_ADMIN only", Uid::current()));
    }
    // Root: shrink the bounding set first, while CAP_SETPCAP is still ours.
    for cap in caps::all() {
        if cap != Capability::CAP_NET_ADMIN {
            caps::drop(None, CapSet::Bounding, cap).map_err(c("drop bounding"))?;
        }
    }
    let who = if user.is_empty() {
        "root".to_string()
    } else {
        let u = User::from_name(user)
            .ok()
            .flatten()
            .ok_or_else(|| PrivError::NoUser(user.into()))?;
        nix::sys::prctl::set_keepcaps(true).map_err(s("keepcaps"))?;
        nix::unistd::setgroups(&[]).map_err(s("setgroups"))?;
        nix::unistd::setresgid(u.gid, u.gid, u.gid).map_err(s("setresgid"))?;
        nix::unistd::setresuid(u.uid, u.uid, u.uid).map_err(s("setresuid"))?;
        nix::sys::prctl::set_keepcaps(false).map_err(s("keepcaps off"))?;
        format!("{user} (uid {}, gid {})", u.uid, u.gid)
    };
    // After setresuid the effective set is empty; take back what is permitted so CAP_SETPCAP can
    // shape the inheritable set, then shrink effective before permitted (effective ⊆ permitted).
    let permitted = caps::read(None, CapSet::Permitted).map_err(c("read permitted"))?;
    caps::set(None, CapSet::Effective, &permitted).map_err(c("restore effective"))?;
    caps::set(None, CapSet::Inheritable, &only).map_err(c("set inheritable"))?;
    caps::set(None, CapSet::Effective, &only).map_err(c("set effective"))?;
    caps::set(None, CapSet::Permitted, &only).map_err(c("set permitted"))?;
    caps::clear(None, CapSet::Ambient).map_err(c("clear ambient"))?;
    caps::raise(None, CapSet::Ambient, Capability::CAP_NET_ADMIN).map_err(c("raise ambient"))?;
    nix::sys::prctl::set_no_new_privs().map_err(s("no_new_privs"))?;
    let _ = Gid::current();
    Ok(format!("{who} with CAP_NET_ADMIN only"))
}
