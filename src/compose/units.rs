//! Hardened systemd units from an adapter's `[[service]]` tables, and the
//! other small files adapters declare as data (sysctl.d, udev rules,
//! environment files). Pure: checked declarations in, file text out. The
//! sandbox settings every service gets are constants here, not options
//! (docs/hardening.md explains each); `adapter` resolves templates, users
//! and secrets before calling in.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A service with everything resolved: exec arguments rendered from their
/// templates, user and secrets checked against the adapter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Unit name without `.service`.
    pub name: String,
    pub description: String,
    /// `simple`, `exec`, `notify` or `oneshot`.
    pub kind: String,
    /// The command line, one argument per item, as it should reach the
    /// program (escaping for systemd is done here). An argument may hold
    /// `${VAR}` environment references that systemd expands: the rendering
    /// of exec templates has already doubled every `$` that came from a value.
    pub exec: Vec<String>,
    /// `None`: `DynamicUser=yes`.
    pub user: Option<String>,
    pub group: Option<String>,
    pub supplementary_groups: Vec<String>,
    /// Absolute paths: `ReadWritePaths=`; those under `/var/lib/` also
    /// `StateDirectory=`.
    pub state: Vec<String>,
    /// `DeviceAllow=` items (`/dev/x rw`).
    pub devices: Vec<String>,
    pub capabilities: Vec<String>,
    pub address_families: Vec<String>,
    pub memory_deny_write_execute: bool,
    pub system_call_filter: Vec<String>,
    /// `Limit<KEY>=` values, keys upper case (`NOFILE`).
    pub limits: BTreeMap<String, String>,
    pub environment: BTreeMap<String, String>,
    pub environment_files: Vec<String>,
    /// `LoadCredential=<slot>:<path>` pairs.
    pub credentials: Vec<(String, String)>,
    /// `AssertPathExists=` paths (secret slots read in place).
    pub assert_paths: Vec<String>,
    pub after: Vec<String>,
    pub wants: Vec<String>,
    pub requires: Vec<String>,
    /// `None`: no `Restart=` line.
    pub restart: Option<String>,
    pub remain_after_exit: bool,
    /// The target whose `.wants/` links this unit.
    pub wanted_by: Option<String>,
}

/// A timer that starts a oneshot service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timer {
    pub on_calendar: String,
    pub persistent: bool,
}

/// Service types an adapter may declare.
pub const TYPES: [&str; 4] = ["simple", "exec", "notify", "oneshot"];

/// `Restart=` values.
pub const RESTARTS: [&str; 7] = [
    "no",
    "on-success",
    "on-failure",
    "on-abnormal",
    "on-watchdog",
    "on-abort",
    "always",
];

/// `Limit<KEY>=` keys systemd knows.
pub const LIMITS: [&str; 16] = [
    "CPU",
    "FSIZE",
    "DATA",
    "STACK",
    "CORE",
    "RSS",
    "NOFILE",
    "AS",
    "NPROC",
    "MEMLOCK",
    "LOCKS",
    "SIGPENDING",
    "MSGQUEUE",
    "NICE",
    "RTPRIO",
    "RTTIME",
];

/// The settings every adapter service gets, in the order written.
pub const ALWAYS: [&str; 20] = [
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "SystemCallArchitectures=native",
    "SystemCallErrorNumber=EPERM",
    "UMask=0077",
    "RemoveIPC=yes",
    "ProtectProc=invisible",
    "KeyringMode=private",
];

/// `%` is a specifier in almost every unit setting: written literally, it
/// must be doubled.
pub fn escape_specifiers(s: &str) -> String {
    s.replace('%', "%%")
}

/// Doubles `$`, so systemd does not expand it in a command line.
pub fn escape_dollars(s: &str) -> String {
    s.replace('$', "$$")
}

/// One command-line argument as systemd reads it: specifiers escaped, and
/// double-quoted (with `\` and `"` escaped) when it is empty, has
/// whitespace, quotes, backslashes, or a `;` systemd would take for a
/// command separator. `$` is left as given (see `Service::exec`).
pub fn quote_arg(arg: &str) -> Result<String, String> {
    if arg.chars().any(char::is_control) {
        return Err(format!(
            "argument {arg:?} contains a newline or control character"
        ));
    }
    let s = escape_specifiers(arg);
    let plain = !s.is_empty()
        && !s.contains(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\'))
        && s != ";";
    if plain {
        return Ok(s);
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

/// The `ExecStart=` value: the program (absolute, plain) and its arguments.
pub fn exec_line(args: &[String]) -> Result<String, String> {
    let Some(program) = args.first() else {
        return Err("exec is empty: give the program and its arguments".to_owned());
    };
    if !program.starts_with('/')
        || program.contains(|c: char| c.is_whitespace() || c.is_control() || "$%\"'\\;".contains(c))
    {
        return Err(format!(
            "exec program {program:?} must be an absolute path without spaces, quotes, `$` or `%`"
        ));
    }
    let mut line = program.clone();
    for a in &args[1..] {
        line.push(' ');
        line.push_str(&quote_arg(a)?);
    }
    Ok(line)
}

/// `Environment="KEY=value"`, escaped for the unit file.
pub fn environment_assignment(key: &str, value: &str) -> Result<String, String> {
    if !valid_env_key(key) {
        return Err(format!(
            "environment variable name {key:?} must match [A-Za-z_][A-Za-z0-9_]*"
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "value of {key} contains a newline or control character"
        ));
    }
    let mut out = String::from("\"");
    for c in escape_specifiers(&format!("{key}={value}")).chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_env_key(key: &str) -> bool {
    key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A word safe to write bare in a unit file (names, paths, families).
pub fn plain_word(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_.:@+-=,~".contains(&b))
}

/// A CPU list for `CPUAffinity=`/`AllowedCPUs=`: `1-7`, `8,9,10`, `0-3,8`.
pub fn valid_cpu_list(s: &str) -> bool {
    !s.is_empty()
        && s.split(',').all(|part| {
            let mut ends = part.split('-');
            let ok = |n: Option<&str>| {
                n.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            };
            match (ends.next(), ends.next(), ends.next()) {
                (a, None, None) => ok(a),
                (a, b, None) => ok(a) && ok(b),
                _ => false,
            }
        })
}

/// The unit file of `s`; `origin` names the adapter in its header.
pub fn service_unit(origin: &str, s: &Service) -> Result<String, String> {
    let mut u = format!("# Generated by InfraKit from adapter {origin:?}.\n[Unit]\n");
    let line = |out: &mut String, key: &str, value: &str| {
        let _ = writeln!(out, "{key}={value}");
    };
    line(&mut u, "Description", &escape_specifiers(&s.description));
    for (key, list) in [
        ("Wants", &s.wants),
        ("Requires", &s.requires),
        ("After", &s.after),
    ] {
        if !list.is_empty() {
            line(&mut u, key, &list.join(" "));
        }
    }
    for p in &s.assert_paths {
        line(&mut u, "AssertPathExists", &escape_specifiers(p));
    }
    u.push_str("\n[Service]\n");
    line(&mut u, "Type", &s.kind);
    line(&mut u, "ExecStart", &exec_line(&s.exec)?);
    if let Some(r) = &s.restart {
        line(&mut u, "Restart", r);
    }
    if s.remain_after_exit {
        line(&mut u, "RemainAfterExit", "yes");
    }
    match &s.user {
        None => line(&mut u, "DynamicUser", "yes"),
        Some(user) => line(&mut u, "User", user),
    }
    if let Some(g) = &s.group {
        line(&mut u, "Group", g);
    }
    if !s.supplementary_groups.is_empty() {
        line(
            &mut u,
            "SupplementaryGroups",
            &s.supplementary_groups.join(" "),
        );
    }
    for (k, v) in &s.environment {
        line(&mut u, "Environment", &environment_assignment(k, v)?);
    }
    for f in &s.environment_files {
        line(&mut u, "EnvironmentFile", &escape_specifiers(f));
    }
    for (slot, path) in &s.credentials {
        line(
            &mut u,
            "LoadCredential",
            &escape_specifiers(&format!("{slot}:{path}")),
        );
    }
    for dir in &s.state {
        if let Some(rel) = dir.strip_prefix("/var/lib/") {
            line(&mut u, "StateDirectory", &escape_specifiers(rel));
        }
    }
    for dir in &s.state {
        line(&mut u, "ReadWritePaths", &escape_specifiers(dir));
    }
    if s.devices.is_empty() {
        line(&mut u, "PrivateDevices", "yes");
    } else {
        line(&mut u, "PrivateDevices", "no");
        line(&mut u, "DevicePolicy", "closed");
        for d in &s.devices {
            line(&mut u, "DeviceAllow", &escape_specifiers(d));
        }
    }
    line(&mut u, "CapabilityBoundingSet", &s.capabilities.join(" "));
    if !s.capabilities.is_empty() {
        line(&mut u, "AmbientCapabilities", &s.capabilities.join(" "));
    }
    line(
        &mut u,
        "RestrictAddressFamilies",
        &s.address_families.join(" "),
    );
    line(
        &mut u,
        "MemoryDenyWriteExecute",
        if s.memory_deny_write_execute {
            "yes"
        } else {
            "no"
        },
    );
    line(&mut u, "SystemCallFilter", &s.system_call_filter.join(" "));
    for setting in ALWAYS {
        u.push_str(setting);
        u.push('\n');
    }
    for (k, v) in &s.limits {
        line(&mut u, &format!("Limit{k}"), v);
    }
    if let Some(t) = &s.wanted_by {
        u.push_str("\n[Install]\n");
        line(&mut u, "WantedBy", t);
    }
    Ok(u)
}

/// The `.timer` unit that starts service `name`.
pub fn timer_unit(origin: &str, name: &str, description: &str, t: &Timer) -> String {
    format!(
        "# Generated by InfraKit from adapter {origin:?}.\n[Unit]\nDescription={}\n\n\
         [Timer]\nOnCalendar={}\nPersistent={}\nUnit={name}.service\n\n\
         [Install]\nWantedBy=timers.target\n",
        escape_specifiers(&format!("Timer: {description}")),
        escape_specifiers(&t.on_calendar),
        if t.persistent { "yes" } else { "no" },
    )
}

/// The drop-in that pins a service to `cpus` (a checked CPU list).
pub fn cpu_dropin(origin: &str, cpus: &str) -> String {
    format!(
        "# Generated by InfraKit from adapter {origin:?}: per-host CPU pinning.\n\
         [Service]\nCPUAffinity={cpus}\nAllowedCPUs={cpus}\n"
    )
}

/// `sysctl.d` text, keys sorted.
pub fn sysctl(origin: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = format!("# Generated by InfraKit from adapter {origin:?}.\n");
    for (k, v) in values {
        let key_ok = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/*".contains(&b));
        if !key_ok {
            return Err(format!("sysctl key {k:?} is not a sysctl name"));
        }
        if v.chars().any(char::is_control) || v.trim() != v || v.is_empty() {
            return Err(format!(
                "sysctl {k} = {v:?}: the value must be non-empty, on one line, without surrounding spaces"
            ));
        }
        let _ = writeln!(out, "{k} = {v}");
    }
    Ok(out)
}

/// A udev rules file: one rule per line.
pub fn udev_rules(origin: &str, rules: &[String]) -> Result<String, String> {
    let mut out = format!("# Generated by InfraKit from adapter {origin:?}.\n");
    for r in rules {
        if r.chars().any(char::is_control) || r.trim().is_empty() {
            return Err(format!("udev rule {r:?} must be one non-empty line"));
        }
        out.push_str(r);
        out.push('\n');
    }
    Ok(out)
}

/// An environment file (`KEY="value"` lines, as systemd's `EnvironmentFile=`
/// and a POSIX shell read them).
pub fn env_file(origin: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = format!("# Generated by InfraKit from adapter {origin:?}.\n");
    for (k, v) in vars {
        if !valid_env_key(k) {
            return Err(format!(
                "environment variable name {k:?} must match [A-Za-z_][A-Za-z0-9_]*"
            ));
        }
        if v.chars().any(char::is_control) {
            return Err(format!(
                "value of {k} contains a newline or control character"
            ));
        }
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            if matches!(c, '"' | '\\' | '$' | '`') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push_str("\"\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Service {
        Service {
            name: "x".into(),
            description: "X 100%".into(),
            kind: "simple".into(),
            exec: vec!["/usr/bin/x".into(), "--flag".into()],
            address_families: vec!["AF_UNIX".into()],
            memory_deny_write_execute: true,
            system_call_filter: vec!["@system-service".into()],
            ..Service::default()
        }
    }

    #[test]
    fn arguments_are_quoted_and_specifiers_escaped() {
        assert_eq!(quote_arg("plain").unwrap(), "plain");
        assert_eq!(quote_arg("a b").unwrap(), "\"a b\"");
        assert_eq!(quote_arg("").unwrap(), "\"\"");
        assert_eq!(quote_arg("50%").unwrap(), "50%%");
        assert_eq!(quote_arg("say \"hi\"\\").unwrap(), "\"say \\\"hi\\\"\\\\\"");
        assert_eq!(quote_arg(";").unwrap(), "\";\"");
        assert_eq!(quote_arg("${CHAIN}").unwrap(), "${CHAIN}");
        assert!(quote_arg("a\nb").is_err());
        assert_eq!(escape_dollars("p$ss"), "p$$ss");
        let line = exec_line(&["/bin/x".into(), "%h".into(), "a b".into()]).unwrap();
        assert_eq!(line, "/bin/x %%h \"a b\"");
        assert!(exec_line(&["x".into()]).is_err());
        assert!(exec_line(&["/bin/$x".into()]).is_err());
        assert!(exec_line(&[]).is_err());
    }

    #[test]
    fn environment_is_escaped() {
        assert_eq!(
            environment_assignment("RUST_LOG", "info,h2=warn 5%").unwrap(),
            "\"RUST_LOG=info,h2=warn 5%%\""
        );
        assert_eq!(environment_assignment("Q", "a\"b").unwrap(), "\"Q=a\\\"b\"");
        assert!(environment_assignment("1X", "v").is_err());
        let f = env_file("t", &BTreeMap::from([("A".into(), "x $y \"z\"".into())])).unwrap();
        assert!(f.ends_with("A=\"x \\$y \\\"z\\\"\"\n"), "{f}");
    }

    #[test]
    fn every_service_gets_the_sandbox() {
        let u = service_unit("t", &service()).unwrap();
        for s in ALWAYS {
            assert!(u.contains(&format!("\n{s}\n")), "{s} missing:\n{u}");
        }
        assert!(u.contains("\nDescription=X 100%%\n"));
        assert!(u.contains("\nDynamicUser=yes\n"));
        assert!(u.contains("\nPrivateDevices=yes\n"));
        assert!(u.contains("\nCapabilityBoundingSet=\n"));
        assert!(!u.contains("AmbientCapabilities"));
        assert!(u.contains("\nMemoryDenyWriteExecute=yes\n"));
        assert!(!u.contains("[Install]"));
    }

    #[test]
    fn declared_settings_are_rendered() {
        let mut s = service();
        s.user = Some("monad".into());
        s.group = Some("monad".into());
        s.devices = vec!["/dev/triedb rw".into()];
        s.capabilities = vec!["CAP_IPC_LOCK".into()];
        s.state = vec!["/var/lib/monad".into(), "/srv/x".into()];
        s.memory_deny_write_execute = false;
        s.limits = BTreeMap::from([("NOFILE".into(), "1048576".into())]);
        s.credentials = vec![("pw".into(), "/etc/monad/pw".into())];
        s.assert_paths = vec!["/etc/monad/id".into()];
        s.wanted_by = Some("multi-user.target".into());
        let u = service_unit("t", &s).unwrap();
        for want in [
            "\nUser=monad\n",
            "\nGroup=monad\n",
            "\nPrivateDevices=no\nDevicePolicy=closed\nDeviceAllow=/dev/triedb rw\n",
            "\nCapabilityBoundingSet=CAP_IPC_LOCK\nAmbientCapabilities=CAP_IPC_LOCK\n",
            "\nStateDirectory=monad\n",
            "\nReadWritePaths=/var/lib/monad\nReadWritePaths=/srv/x\n",
            "\nMemoryDenyWriteExecute=no\n",
            "\nLimitNOFILE=1048576\n",
            "\nLoadCredential=pw:/etc/monad/pw\n",
            "\nAssertPathExists=/etc/monad/id\n",
            "\n[Install]\nWantedBy=multi-user.target\n",
        ] {
            assert!(u.contains(want), "{want:?} missing:\n{u}");
        }
        assert!(!u.contains("DynamicUser"));
    }

    #[test]
    fn small_files() {
        assert!(valid_cpu_list("1-7") && valid_cpu_list("8,9,10") && valid_cpu_list("0-3,8"));
        assert!(
            !valid_cpu_list("")
                && !valid_cpu_list("1-")
                && !valid_cpu_list("a")
                && !valid_cpu_list("1-2-3")
        );
        assert!(cpu_dropin("t", "1-7").ends_with("[Service]\nCPUAffinity=1-7\nAllowedCPUs=1-7\n"));
        let s = sysctl(
            "t",
            &BTreeMap::from([("net.core.rmem_max".into(), "62500000".into())]),
        )
        .unwrap();
        assert!(s.ends_with("\nnet.core.rmem_max = 62500000\n"));
        assert!(sysctl("t", &BTreeMap::from([("a b".into(), "1".into())])).is_err());
        assert!(udev_rules("t", &["a\nb".into()]).is_err());
        let t = timer_unit(
            "t",
            "x",
            "X",
            &Timer {
                on_calendar: "hourly".into(),
                persistent: true,
            },
        );
        assert!(t.contains("\nOnCalendar=hourly\nPersistent=yes\nUnit=x.service\n"));
    }
}
