//! Test helpers (feature `test-util`): what epoll was asked to watch on a socket.
//!
//! They panic on failure, as test code does; they are not built into the daemons.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::RawFd;

/// `EPOLLIN`.
pub const EPOLLIN: u32 = 0x1;
/// `EPOLLOUT`.
pub const EPOLLOUT: u32 = 0x4;

/// The epoll events registered for descriptor `fd` in any epoll instance of this process
/// (from /proc/self/fdinfo), e.g. `[0x80002019]`.
pub fn registrations(fd: RawFd) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return found;
    };
    for entry in dir.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy() != "anon_inode:[eventpoll]" {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        for line in info.lines() {
            // "tfd:        9 events: 8000201d data: ..."
            let mut words = line.split_whitespace();
            if words.next() != Some("tfd:") || words.next() != Some(&fd.to_string()) {
                continue;
            }
            if words.next() == Some("events:")
                && let Some(ev) = words.next().and_then(|h| u32::from_str_radix(h, 16).ok())
            {
                found.push(ev);
            }
        }
    }
    found
}

/// Panics unless `fd` is registered, and never for write readiness. (Another test's runtime
/// may still hold a stale entry under the same number, so every entry found is checked.)
pub fn assert_reads_only(fd: RawFd) {
    let regs = registrations(fd);
    assert!(!regs.is_empty(), "fd {fd} is not registered");
    assert!(
        regs.iter().all(|e| e & (EPOLLIN | EPOLLOUT) == EPOLLIN),
        "{regs:x?}"
    );
}
