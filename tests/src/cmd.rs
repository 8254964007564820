//! Running commands to completion with a deadline, locating the workspace's binaries, and guardctl.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::{Error, Result};

/// How long a one-shot command (ip, nft, guardctl, `fwd --validate`) may take before it is
/// killed and the test fails. Generous: the machine is small and busy.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// What a finished command did.
#[derive(Debug, Clone)]
pub struct Out {
    /// The command line, for messages.
    pub cmd: String,
    /// Its exit status.
    pub status: ExitStatus,
    /// Its standard output, lossily decoded.
    pub stdout: String,
    /// Its standard error, lossily decoded.
    pub stderr: String,
}

impl Out {
    /// The exit code; `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Its stdout if it exited 0, else an error showing the command, status and both streams.
    pub fn ok(self) -> Result<String> {
        if self.success() {
            Ok(self.stdout)
        } else {
            Err(Error::msg(self.describe()))
        }
    }

    /// Command, status and both streams, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmd, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion (stdin closed, both streams captured), killing it by PID if it
/// runs past `deadline`.
pub fn run(cmd: &mut Command, deadline: Duration) -> Result<Out> {
    let line = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::msg(format!("cannot start `{line}`: {e}")))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(deadline) {
        Ok(out) => out,
        Err(_) => {
            kill_pid(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waiter.join();
            return Err(Error::msg(format!(
                "`{line}` did not finish within {deadline:?}; killed it"
            )));
        }
    };
    let _ = waiter.join();
    let out = out.map_err(|e| Error::msg(format!("waiting for `{line}`: {e}")))?;
    Ok(Out {
        cmd: line,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `cmd` with the default deadline and returns its stdout, failing unless it exited 0.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    run(cmd, COMMAND_DEADLINE)?.ok()
}

/// Sends `sig` to one process we started, by PID. Errors (already gone) are ignored.
pub fn kill_pid(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// SIGTERMs a daemon we started and waits up to `timeout` for it to exit. Returns its exit
/// status, or `None` when it outlived the timeout (it is then SIGKILLed and reaped).
pub fn terminate(child: &mut std::process::Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    kill_pid(child.id(), nix::sys::signal::Signal::SIGTERM);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The directory holding the workspace's binaries (`fwd`, `guardctl`, `dnsd`, ...).
///
/// `GUARD_BIN_DIR` wins; otherwise the profile directory of the running test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("GUARD_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| Error::msg("the test executable has no parent directory"))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir
            .parent()
            .ok_or_else(|| Error::msg("target/<profile>/deps has no parent"))?;
    }
    Ok(dir.to_path_buf())
}

/// The path of the workspace binary `name`, failing with how to build it when it is missing.
pub fn bin(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::msg(format!(
            "binary `{name}` not found at {}; run `cargo build --workspace --bins` first \
             (or set GUARD_BIN_DIR)",
            path.display()
        )))
    }
}

/// A `guardctl --socket SOCKET ARGS...` command (not started). Chain `.uid()`/`.gid()` (or use
/// [`as_user`]) to run it as another user, then [`run`] it.
pub fn guardctl(socket: &Path, args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(bin("guardctl")?);
    cmd.arg("--socket").arg(socket).args(args);
    Ok(cmd)
}

/// Makes `cmd` run as `uid`/`gid` with no supplementary groups (std drops them when it sets
/// the uid as root).
pub fn as_user(cmd: &mut Command, uid: u32, gid: u32) -> &mut Command {
    cmd.uid(uid).gid(gid)
}
