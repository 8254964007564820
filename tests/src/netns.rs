//! One network namespace per guard: created with `ip netns add`, removed in Drop (also on panic).

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::CloneFlags;

use crate::cmd::{self, Out};
use crate::error::{Context, Error, Result};

/// Every name the harness creates starts with this, then the test process's PID.
pub const NAME_PREFIX: &str = "gt-";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

/// A name unique to this process and call: `gt-<pid>-<n>`. Namespaces of one topology share one.
pub fn unique_prefix() -> String {
    format!(
        "{NAME_PREFIX}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace that exists for as long as this guard does.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` with `lo` up. Fails (never skips) when not root.
    ///
    /// ICMP error rate limits are lifted inside, so that a burst of refused probes each gets
    /// its ICMP error rather than a silent timeout.
    pub fn new(name: &str) -> Result<Self> {
        crate::require_root()?;
        STALE_CLEANUP.call_once(remove_stale);
        cmd::run_ok(Command::new("ip").args(["netns", "add", name]))
            .context(format!("creating netns {name}"))?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.sysctl("net.ipv4.icmp_ratelimit", "0")?;
        ns.sysctl("net.ipv6.icmp.ratelimit", "0")?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`).
    /// `ip netns exec` execs, so the child's PID is the program's own.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `argv` inside the namespace to completion; the result says how it exited.
    pub fn exec(&self, argv: &[&str]) -> Result<Out> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| Error::msg("Netns::exec: empty argv"))?;
        cmd::run(self.cmd(program).args(args), cmd::COMMAND_DEADLINE)
    }

    /// Runs `argv` inside the namespace and returns its stdout, failing unless it exited 0.
    pub fn exec_ok(&self, argv: &[&str]) -> Result<String> {
        self.exec(argv)?
            .ok()
            .context(format!("in netns {}", self.name))
    }

    /// `ip -n NAME ARGS...`, failing unless it exited 0.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        cmd::run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
            .context(format!("in netns {}", self.name))
    }

    /// Sets a sysctl inside the namespace (`net.*` keys are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec_ok(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a fresh thread that has joined this namespace, and returns its result.
    ///
    /// Sockets created by `f` stay in this namespace wherever they are used later, so this is
    /// how probes connect and servers bind. A panic in `f` is re-raised here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = Path::new("/run/netns").join(&self.name);
        let file = File::open(&path).context(format!("opening {}", path.display()))?;
        std::thread::scope(|s| {
            let handle = s.spawn(move || -> Result<T> {
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                    .context(format!("setns into {}", path.display()))?;
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match cmd::run(
            Command::new("ip").args(["netns", "del", &self.name]),
            cmd::COMMAND_DEADLINE,
        ) {
            Ok(out) if out.success() => {}
            Ok(out) => eprintln!("harness: removing netns {}: {}", self.name, out.describe()),
            Err(e) => eprintln!("harness: removing netns {}: {e}", self.name),
        }
    }
}

/// Removes namespaces left by harness processes that died without running their guards
/// (SIGKILL, OOM): `gt-<pid>-*` whose PID no longer exists. Processes still inside such a
/// namespace were started by that dead test run (a daemon under test); they are killed by PID.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if owner == std::process::id() || Path::new("/proc").join(owner.to_string()).exists() {
            continue;
        }
        if let Ok(out) = cmd::run(
            Command::new("ip").args(["netns", "pids", &name]),
            cmd::COMMAND_DEADLINE,
        ) {
            for pid in out.stdout.split_whitespace().filter_map(|p| p.parse().ok()) {
                cmd::kill_pid(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        let _ = cmd::run(
            Command::new("ip").args(["netns", "del", &name]),
            cmd::COMMAND_DEADLINE,
        );
    }
}
