//! Deployment checks (issue 4): the systemd units' sandbox and exposure score, the sysusers and tmpfiles entries, and the .deb built by `scripts/package.sh`.
//!
//! The unit checks run `systemd-analyze` on the files in `systemd/`; the package check builds
//! the real package (reusing the release build; cargo-deb is installed once if missing) and
//! inspects it with `dpkg-deb`, unpacking it into a scratch root with `dpkg -x`, never
//! installing it. Missing tools fail the tests with the package to install: nothing is skipped.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use guard_tests::OrFail;
use guard_tests::cmd::{self, COMMAND_DEADLINE, Out};

/// The exposure score (`systemd-analyze security`, 0 = locked down, 10 = wide open) above which
/// a service fails. The units aim at 1.5 or less; 2.0 leaves room for systemd's weights to move.
const MAX_EXPOSURE: f64 = 2.0;

/// Building the package: a cold release build plus a first `cargo install cargo-deb` on a
/// small machine. An up-to-date tree takes well under a minute.
const PACKAGE_DEADLINE: Duration = Duration::from_secs(30 * 60);

const SERVICES: [&str; 2] = ["guard-fwd.service", "guard-dnsd.service"];
const UNITS: [&str; 3] = [
    "guard-fwd.service",
    "guard-dnsd.service",
    "guard-dnsd.socket",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .or_fail("the tests crate has a parent directory")
        .to_path_buf()
}

fn systemd_dir() -> PathBuf {
    workspace().join("systemd")
}

/// Fails (never skips) when `tool` is missing, naming the Debian package that has it.
fn require(tool: &str, package: &str) -> PathBuf {
    guard_tests::which(tool)
        .ok_or_else(|| {
            format!("`{tool}` is not on PATH: install the Debian package `{package}` (make deps)")
        })
        .or_fail("missing tool")
}

fn run(cmd: &mut Command) -> Out {
    cmd::run(cmd, COMMAND_DEADLINE).or_fail("run command")
}

fn run_ok(cmd: &mut Command) -> String {
    run(cmd).ok().or_fail("command failed")
}

// === unit files ===

/// One unit file: every `Key=value` assignment per section, in order (keys may repeat).
struct Unit {
    name: String,
    sections: BTreeMap<String, Vec<(String, String)>>,
}

impl Unit {
    fn load(path: &Path) -> Unit {
        let text = fs::read_to_string(path).or_fail(&format!("read {}", path.display()));
        let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        let mut current = String::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                current = name.to_owned();
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .or_fail(&format!("{}: not an assignment: {line}", path.display()));
            sections
                .entry(current.clone())
                .or_default()
                .push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let name = path
            .file_name()
            .or_fail("unit file name")
            .to_string_lossy()
            .into_owned();
        Unit { name, sections }
    }

    /// Every value assigned to `key` in `section`, in order.
    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.sections
            .get(section)
            .map(|kv| {
                kv.iter()
                    .filter(|(k, _)| k == key)
                    .map(|(_, v)| v.as_str())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The single value of `key` in `section`; fails if it is absent or assigned twice.
    fn one(&self, section: &str, key: &str) -> &str {
        let values = self.all(section, key);
        assert_eq!(
            values.len(),
            1,
            "{}: [{section}] {key}= should be set once, found {values:?}",
            self.name
        );
        values[0]
    }

    fn expect(&self, section: &str, key: &str, want: &str) {
        assert_eq!(
            self.one(section, key),
            want,
            "{}: [{section}] {key}=",
            self.name
        );
    }
}

fn unit(name: &str) -> Unit {
    Unit::load(&systemd_dir().join(name))
}

/// `systemd-analyze security --offline=true` on one unit file: its overall exposure score
/// and the whole report (for failure messages).
fn exposure(path: &Path) -> (f64, String) {
    require("systemd-analyze", "systemd");
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(path));
    let report = format!("{}{}", out.stdout, out.stderr);
    let score = report
        .lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for ")
                .map(|(_, rest)| rest)
        })
        .and_then(|rest| rest.rsplit_once(": "))
        .and_then(|(_, tail)| tail.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .ok_or_else(|| {
            format!(
                "no overall exposure level in the report:\n{}",
                out.describe()
            )
        })
        .or_fail("systemd-analyze security");
    (score, report)
}

fn assert_exposure(path: &Path) -> f64 {
    let (score, report) = exposure(path);
    assert!(
        score <= MAX_EXPOSURE,
        "{}: systemd-analyze security exposure {score} is above {MAX_EXPOSURE} (target 1.5); \
         the ✗ lines say what opened it:\n{report}",
        path.display()
    );
    score
}

#[test]
fn services_exposure_is_at_most_2_0() {
    for s in SERVICES {
        let score = assert_exposure(&systemd_dir().join(s));
        eprintln!("{s}: exposure {score}");
    }
}

#[test]
fn fwd_unit_keeps_only_cap_net_admin_and_no_ip() {
    let u = unit("guard-fwd.service");
    u.expect("Service", "Type", "notify");
    u.expect("Service", "User", "guard-fwd");
    u.expect("Service", "AmbientCapabilities", "CAP_NET_ADMIN");
    u.expect("Service", "CapabilityBoundingSet", "CAP_NET_ADMIN");
    u.expect("Service", "RestrictAddressFamilies", "AF_UNIX AF_NETLINK");
    u.expect("Service", "IPAddressDeny", "any");
    u.expect("Service", "WatchdogSec", "30s");
    u.expect("Service", "StateDirectory", "guard");
    u.expect(
        "Service",
        "ExecStart",
        "/usr/bin/fwd --config /etc/guard/fwd.toml --log-format json",
    );
    // fwd execs /usr/sbin/nft for the ruleset: nothing may forbid that exec.
    for k in [
        "NoExecPaths",
        "ExecPaths",
        "PrivateNetwork",
        "InaccessiblePaths",
    ] {
        assert!(
            u.all("Service", k).is_empty(),
            "guard-fwd.service must not set {k}="
        );
    }
    u.expect("Service", "ExecReload", "/bin/kill -HUP $MAINPID");
    assert_eq!(u.all("Service", "SupplementaryGroups"), ["guard"]);
    let filter = u.all("Service", "SystemCallFilter");
    assert_eq!(
        filter.first(),
        Some(&"@system-service"),
        "allow list first: {filter:?}"
    );
    assert!(filter.contains(&"~@privileged @resources"), "{filter:?}");
    assert!(
        filter.contains(&"capset @chown"),
        "privdrop needs capset, the socket chown: {filter:?}"
    );
    assert_common_hardening(&u);
}

#[test]
fn dnsd_unit_has_no_capability_and_takes_port_53_from_its_socket() {
    let u = unit("guard-dnsd.service");
    u.expect("Service", "Type", "notify");
    u.expect("Service", "User", "guard-dnsd");
    u.expect("Service", "Group", "guard");
    u.expect("Service", "CapabilityBoundingSet", "");
    u.expect("Service", "AmbientCapabilities", "");
    u.expect(
        "Service",
        "RestrictAddressFamilies",
        "AF_UNIX AF_INET AF_INET6",
    );
    u.expect("Service", "WatchdogSec", "30s");
    u.expect("Service", "ExecReload", "/bin/kill -HUP $MAINPID");
    u.expect(
        "Service",
        "ExecStart",
        "/usr/bin/dnsd --config /etc/guard/dnsd.toml --log-format json",
    );
    for k in ["Requires", "After"] {
        let v = u.one("Unit", k);
        assert!(
            v.contains("guard-fwd.service"),
            "[Unit] {k}= names guard-fwd.service: {v}"
        );
        assert!(
            v.contains("guard-dnsd.socket"),
            "[Unit] {k}= names guard-dnsd.socket: {v}"
        );
    }
    assert_eq!(
        u.all("Service", "SystemCallFilter"),
        ["@system-service", "~@privileged @resources"]
    );
    assert_common_hardening(&u);

    let s = unit("guard-dnsd.socket");
    assert_eq!(
        s.all("Socket", "ListenDatagram"),
        ["127.0.0.1:53", "[::1]:53"]
    );
    assert_eq!(
        s.all("Socket", "ListenStream"),
        ["127.0.0.1:53", "[::1]:53"]
    );
    s.expect("Socket", "Accept", "no");
    s.expect("Install", "WantedBy", "sockets.target");
}

/// What every guard service sets, whatever systemd-analyze weighs it.
fn assert_common_hardening(u: &Unit) {
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/run/guard"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("ProtectProc", "invisible"),
        ("ProcSubset", "pid"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("UMask", "0077"),
        ("NotifyAccess", "main"),
    ] {
        u.expect("Service", k, v);
    }
}

/// A scratch root with the host's user database, the units' users and directories applied by
/// the real systemd-sysusers and systemd-tmpfiles (`--root`), nothing outside it touched.
fn apply_users_and_dirs(root: &Path, sysusers: &Path, tmpfiles: &Path) {
    require("systemd-sysusers", "systemd");
    require("systemd-tmpfiles", "systemd");
    let etc = root.join("etc");
    fs::create_dir_all(&etc).or_fail("mkdir etc");
    for f in ["passwd", "group", "shadow", "gshadow"] {
        let host = Path::new("/etc").join(f);
        if host.exists() {
            fs::copy(&host, etc.join(f)).or_fail(&format!("copy {}", host.display()));
        }
    }
    run_ok(
        Command::new("systemd-sysusers")
            .arg(format!("--root={}", root.display()))
            .arg(sysusers),
    );
    run_ok(
        Command::new("systemd-tmpfiles")
            .arg(format!("--root={}", root.display()))
            .arg("--create")
            .arg(tmpfiles),
    );
}

/// `name`'s uid (users) or gid (groups) and its member list, from a scratch root's database.
fn db_entry(root: &Path, file: &str, name: &str) -> (u32, String) {
    let text = fs::read_to_string(root.join("etc").join(file)).or_fail(file);
    let fields: Vec<&str> = text
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name))
        .ok_or_else(|| format!("{file} has no entry {name}:\n{text}"))
        .or_fail("user database");
    let id = fields
        .get(2)
        .and_then(|s| s.parse().ok())
        .or_fail("numeric id");
    (id, fields.get(3).copied().unwrap_or_default().to_owned())
}

/// The users, groups and directories the units rely on: guard-fwd and guard-dnsd in group
/// guard, /run/guard sticky and group-writable for guard, /var/lib/guard fwd's alone.
fn assert_users_and_dirs(root: &Path) {
    let (fwd_uid, _) = db_entry(root, "passwd", "guard-fwd");
    let (dnsd_uid, _) = db_entry(root, "passwd", "guard-dnsd");
    let (guard_gid, members) = db_entry(root, "group", "guard");
    let members: Vec<&str> = members.split(',').collect();
    assert!(
        members.contains(&"guard-fwd"),
        "guard-fwd in group guard: {members:?}"
    );
    assert!(
        members.contains(&"guard-dnsd"),
        "guard-dnsd in group guard: {members:?}"
    );
    assert_ne!(fwd_uid, dnsd_uid);
    for (dir, mode, uid, gid) in [
        ("run/guard", 0o1770, 0, guard_gid),
        (
            "var/lib/guard",
            0o700,
            fwd_uid,
            db_entry(root, "group", "guard-fwd").0,
        ),
        ("etc/guard", 0o755, 0, 0),
    ] {
        let m = fs::metadata(root.join(dir)).or_fail(dir);
        assert!(m.is_dir(), "/{dir} is a directory");
        assert_eq!(m.permissions().mode() & 0o7777, mode, "/{dir} mode");
        assert_eq!((m.uid(), m.gid()), (uid, gid), "/{dir} owner");
    }
}

#[test]
fn sysusers_and_tmpfiles_apply_in_a_scratch_root() {
    let root = tempfile::tempdir().or_fail("tempdir");
    apply_users_and_dirs(
        root.path(),
        &systemd_dir().join("guard.sysusers.conf"),
        &systemd_dir().join("guard.tmpfiles.conf"),
    );
    assert_users_and_dirs(root.path());
}

/// `systemd-analyze verify --root=ROOT` on the units installed in ROOT. ROOT gets the host's
/// own units (sysinit.target, ...) and /bin/kill so that only guard's files are judged.
fn verify_units(root: &Path) {
    require("systemd-analyze", "systemd");
    let units = root.join("usr/lib/systemd/system");
    fs::create_dir_all(&units).or_fail("mkdir units");
    for dir in ["/usr/lib/systemd/system", "/lib/systemd/system"] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let dest = units.join(e.file_name());
            if !dest.exists() && e.path().is_file() {
                fs::copy(e.path(), &dest).or_fail("copy a host unit");
            }
        }
    }
    let kill = root.join("bin/kill");
    if !kill.exists() {
        fs::create_dir_all(root.join("bin")).or_fail("mkdir bin");
        fs::copy(guard_tests::which("kill").or_fail("kill on PATH"), &kill).or_fail("copy kill");
    }
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(UNITS));
    assert!(
        out.success() && out.stderr.trim().is_empty(),
        "systemd-analyze verify found problems:\n{}",
        out.describe()
    );
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let root = tempfile::tempdir().or_fail("tempdir");
    let units = root.path().join("usr/lib/systemd/system");
    fs::create_dir_all(&units).or_fail("mkdir");
    for u in UNITS {
        fs::copy(systemd_dir().join(u), units.join(u)).or_fail("copy unit");
    }
    // Stand-ins for the binaries: verify only checks that ExecStart= is executable.
    let bin = root.path().join("usr/bin");
    fs::create_dir_all(&bin).or_fail("mkdir bin");
    for b in ["fwd", "dnsd"] {
        fs::write(bin.join(b), "#!/bin/sh\n").or_fail("stand-in");
        fs::set_permissions(bin.join(b), fs::Permissions::from_mode(0o755)).or_fail("chmod");
    }
    verify_units(root.path());
}

// === the package ===

/// Every file the package ships (directories aside), with its mode.
const PACKAGE_FILES: &[(&str, u32)] = &[
    ("etc/guard/dnsd.toml", 0o644),
    ("etc/guard/fwd.toml", 0o644),
    ("usr/bin/dnsd", 0o755),
    ("usr/bin/fwd", 0o755),
    ("usr/bin/guardctl", 0o755),
    ("usr/lib/systemd/system/guard-dnsd.service", 0o644),
    ("usr/lib/systemd/system/guard-dnsd.socket", 0o644),
    ("usr/lib/systemd/system/guard-fwd.service", 0o644),
    ("usr/lib/sysusers.d/guard.conf", 0o644),
    ("usr/lib/tmpfiles.d/guard.conf", 0o644),
    ("usr/share/bash-completion/completions/guardctl", 0o644),
    ("usr/share/doc/guard/README.md", 0o644),
    ("usr/share/doc/guard/copyright", 0o644),
    ("usr/share/doc/guard/examples/dnsd.example.toml", 0o644),
    ("usr/share/doc/guard/examples/fwd.example.toml", 0o644),
    ("usr/share/fish/vendor_completions.d/guardctl.fish", 0o644),
    ("usr/share/man/man1/guardctl.1.gz", 0o644),
    ("usr/share/man/man8/dnsd.8.gz", 0o644),
    ("usr/share/man/man8/fwd.8.gz", 0o644),
    ("usr/share/zsh/vendor-completions/_guardctl", 0o644),
];

/// Builds the .deb with scripts/package.sh (fast compression) and returns its path.
fn build_package() -> PathBuf {
    require("dpkg-deb", "dpkg");
    require("python3", "python3");
    let script = workspace().join("scripts/package.sh");
    // The release build the tests already made: the shipped `dist` profile (fat LTO) packages
    // the same files and would add minutes of linking.
    let out = cmd::run(
        Command::new(&script)
            .arg("--fast")
            .env("GUARD_PROFILE", "release"),
        PACKAGE_DEADLINE,
    )
    .or_fail("package.sh");
    let stdout = out.clone().ok().or_fail("scripts/package.sh failed");
    let deb = PathBuf::from(
        stdout
            .lines()
            .last()
            .or_fail("package.sh printed the .deb path")
            .trim(),
    );
    assert!(
        deb.is_file(),
        "package.sh printed {}, which is not a file:\n{}",
        deb.display(),
        out.describe()
    );
    deb
}

/// Maintainer-script lines that run systemctl (comments and messages aside).
fn systemctl_calls(script: &str) -> Vec<String> {
    script
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with("echo"))
        .filter(|l| l.contains("systemctl "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn deb_package_installs_binaries_units_configs_and_completions() {
    let deb = build_package();

    // The file list and modes, from `dpkg-deb -c`: PERMS OWNER/GROUP SIZE DATE TIME PATH.
    let listing = run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(perms), Some(owner), Some(path)) = (fields.first(), fields.get(1), fields.get(5))
        else {
            panic!("unexpected dpkg-deb -c line: {line}");
        };
        assert_eq!(*owner, "0/0", "{path} is owned by root: {line}");
        if !perms.starts_with('d') {
            files.insert(path.trim_start_matches("./").to_owned(), perms.to_string());
        }
    }
    let want: BTreeMap<String, String> = PACKAGE_FILES
        .iter()
        .map(|(p, m)| {
            (
                (*p).to_owned(),
                if *m == 0o755 {
                    "-rwxr-xr-x"
                } else {
                    "-rw-r--r--"
                }
                .to_owned(),
            )
        })
        .collect();
    assert_eq!(files, want, "package file list (dpkg-deb -c):\n{listing}");

    // Control: dependencies, conffiles, maintainer scripts that never enable or start a unit.
    let depends = run_ok(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Depends"),
    );
    for d in ["nftables", "libnftnl11", "libmnl0"] {
        assert!(
            depends
                .split(',')
                .any(|x| x.split_whitespace().next() == Some(d)),
            "Depends lacks {d}: {depends}"
        );
    }
    let control = tempfile::tempdir().or_fail("tempdir");
    run_ok(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(&deb)
            .arg(control.path()),
    );
    let conffiles = fs::read_to_string(control.path().join("conffiles")).or_fail("conffiles");
    let mut conffiles: Vec<&str> = conffiles.lines().collect();
    conffiles.sort_unstable();
    assert_eq!(conffiles, ["/etc/guard/dnsd.toml", "/etc/guard/fwd.toml"]);
    let postinst = fs::read_to_string(control.path().join("postinst")).or_fail("postinst");
    assert!(
        postinst.contains("systemd-sysusers"),
        "postinst creates the users:\n{postinst}"
    );
    assert!(
        postinst.contains("systemd-tmpfiles") && postinst.contains("--create"),
        "{postinst}"
    );
    for call in systemctl_calls(&postinst) {
        assert!(
            call.starts_with("systemctl daemon-reload")
                || call.starts_with("systemctl try-restart"),
            "postinst may only reload systemd or restart units already running, never enable \
             or start one (a firewall must be configured first): {call}"
        );
    }

    // Unpacked (dpkg -x, never installed): the files are the ones in the tree, the users and
    // directories apply, the units verify, and the packaged configurations validate.
    let root = tempfile::tempdir().or_fail("tempdir");
    let r = root.path();
    run_ok(Command::new("dpkg").arg("-x").arg(&deb).arg(r));
    for (packaged, source) in [
        (
            "usr/lib/systemd/system/guard-fwd.service",
            "systemd/guard-fwd.service",
        ),
        (
            "usr/lib/systemd/system/guard-dnsd.service",
            "systemd/guard-dnsd.service",
        ),
        (
            "usr/lib/systemd/system/guard-dnsd.socket",
            "systemd/guard-dnsd.socket",
        ),
        (
            "usr/lib/sysusers.d/guard.conf",
            "systemd/guard.sysusers.conf",
        ),
        (
            "usr/lib/tmpfiles.d/guard.conf",
            "systemd/guard.tmpfiles.conf",
        ),
    ] {
        assert_eq!(
            fs::read(r.join(packaged)).or_fail(packaged),
            fs::read(workspace().join(source)).or_fail(source),
            "/{packaged} is {source}"
        );
    }
    apply_users_and_dirs(
        r,
        &r.join("usr/lib/sysusers.d/guard.conf"),
        &r.join("usr/lib/tmpfiles.d/guard.conf"),
    );
    assert_users_and_dirs(r);
    verify_units(r);
    for s in SERVICES {
        assert_exposure(&r.join("usr/lib/systemd/system").join(s));
    }
    let fwd_toml = fs::read_to_string(r.join("etc/guard/fwd.toml")).or_fail("fwd.toml");
    assert!(
        fwd_toml.lines().any(|l| l == r#"socket_group = "guard""#),
        "{fwd_toml}"
    );
    assert!(
        fwd_toml
            .lines()
            .any(|l| l == r#"authorizer_users = ["guard-dnsd"]"#),
        "{fwd_toml}"
    );
    // fwd resolves guard-dnsd and guard at load time: validate against the scratch root's user
    // database, bound over /etc/passwd and /etc/group in a private mount namespace only.
    require("unshare", "util-linux");
    let validate = format!(
        "mount --bind {r}/etc/passwd /etc/passwd && mount --bind {r}/etc/group /etc/group && \
         {r}/usr/bin/fwd --validate --config {r}/etc/guard/fwd.toml",
        r = r.display()
    );
    run_ok(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &validate,
    ]));
    run_ok(
        Command::new(r.join("usr/bin/dnsd"))
            .arg("--validate")
            .arg("--config")
            .arg(r.join("etc/guard/dnsd.toml")),
    );
    let completion = fs::read_to_string(r.join("usr/share/bash-completion/completions/guardctl"))
        .or_fail("completion");
    assert!(
        completion.contains("guardctl"),
        "bash completion for guardctl"
    );
    run_ok(Command::new(r.join("usr/bin/guardctl")).arg("--version"));
}
