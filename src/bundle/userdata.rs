//! Renders one host's `#cloud-config` and fits it to its provider's
//! user-data budget. The YAML is written by hand from a small model (every
//! scalar JSON-quoted, which YAML reads the same; file contents as literal
//! blocks where that is exact): no YAML library, and the same model always
//! gives the same bytes.
//!
//! Fitting: the plain form if it is within budget; else, where the provider
//! takes binary user-data, the whole document gzipped (cloud-init gunzips
//! it); else, for text-only providers, the file contents as `gz+b64`. Still
//! over budget is an error naming the provider, the limit, the size and the
//! remedy. Never truncated.

use std::io::Write;

use base64::Engine;

use crate::error::{Error, Result};

/// Where the user-data goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    Ec2,
    Gcp,
    Azure,
    Hetzner,
    Digitalocean,
    Openstack,
    Nocloud,
}

/// How a provider measures its user-data limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    /// The bytes as given (before any base64 the API wraps them in).
    Raw,
    /// The length after base64-encoding (OpenStack Nova).
    Base64,
}

/// A provider's user-data limit (UPSTREAM.md §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub limit: usize,
    pub measure: Measure,
    /// Binary (gzip) user-data is accepted; otherwise it must be text.
    pub binary: bool,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Ec2 => "ec2",
            Provider::Gcp => "gcp",
            Provider::Azure => "azure",
            Provider::Hetzner => "hetzner",
            Provider::Digitalocean => "digitalocean",
            Provider::Openstack => "openstack",
            Provider::Nocloud => "nocloud",
        }
    }

    /// The limit, or `None` (NoCloud: a file on the seed volume).
    pub fn budget(self) -> Option<Budget> {
        let (limit, measure, binary) = match self {
            // 16 KB "in raw form, before it is base64-encoded".
            Provider::Ec2 => (16_384, Measure::Raw, true),
            // customData's decoded "binary array" is at most 65535 bytes.
            Provider::Azure => (65_535, Measure::Raw, true),
            // "must be base64 encoded and is restricted to 65535 bytes".
            Provider::Openstack => (65_535, Measure::Base64, true),
            // A JSON string field: text only.
            Provider::Hetzner => (32_768, Measure::Raw, false),
            // "must be plain text and may not exceed 64 KiB".
            Provider::Digitalocean => (65_536, Measure::Raw, false),
            // A metadata value: a string of at most 256 KiB.
            Provider::Gcp => (262_144, Measure::Raw, false),
            Provider::Nocloud => return None,
        };
        Some(Budget {
            limit,
            measure,
            binary,
        })
    }
}

impl Budget {
    /// `bytes`' size as the provider counts it.
    pub fn size_of(&self, bytes: usize) -> usize {
        match self.measure {
            Measure::Raw => bytes,
            Measure::Base64 => bytes.div_ceil(3) * 4,
        }
    }
}

/// Checks delivered user-data against `provider`'s budget.
pub fn check(provider: Provider, host: &str, bytes: &[u8], form: Form) -> Result<()> {
    let Some(budget) = provider.budget() else {
        return Ok(());
    };
    let size = budget.size_of(bytes.len());
    if size <= budget.limit {
        return Ok(());
    }
    let counted = match budget.measure {
        Measure::Raw => "bytes",
        Measure::Base64 => "bytes after base64",
    };
    Err(Error::usage(
        format!("--provider {}", provider.name()),
        format!(
            "user-data for host {host} is {size} {counted} ({}), over {}'s limit of {} {counted}; \
             it is never truncated: shorten the host's params or ssh-authorized-keys, \
             or use --provider nocloud (no limit)",
            form.describe(),
            provider.name(),
            budget.limit,
        ),
    ))
}

/// The form user-data was delivered in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Form {
    /// Plain `#cloud-config` text.
    Text,
    /// Text, with file contents as `gz+b64`.
    GzB64Files,
    /// The whole document gzipped.
    Gzip,
}

impl Form {
    pub fn describe(self) -> &'static str {
        match self {
            Form::Text => "plain text",
            Form::GzB64Files => "text with gz+b64 file contents",
            Form::Gzip => "gzipped",
        }
    }
}

/// A file cloud-init writes (`write_files`), owned by root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct File {
    pub path: String,
    pub mode: u32,
    pub content: String,
}

/// The admin account cloud-init creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admin {
    pub user: String,
    pub group: String,
    /// crypt(3) hash for sudo; the password is locked without one.
    pub password_hash: Option<String>,
    pub ssh_authorized_keys: Vec<String>,
}

/// One host's cloud-config, as a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudConfig {
    /// `# ` comment lines after `#cloud-config`.
    pub header: Vec<String>,
    pub hostname: Option<String>,
    pub admin: Option<Admin>,
    pub packages: Vec<String>,
    pub files: Vec<File>,
    /// The one runcmd entry, as an argv.
    pub runcmd: Vec<String>,
}

/// A YAML double-quoted scalar with the value `s`, in printable ASCII:
/// everything else is escaped, so no character (U+2028, U+0085, a control)
/// can read as a line break or end the scalar early.
pub(crate) fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if u32::from(c) <= 0xffff => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push_str(&format!("\\U{:08x}", u32::from(c))),
        }
    }
    out.push('"');
    out
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| q(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// Whether `s` reads back exactly as a `|` literal block: lines of
/// printable ASCII (no other character can end the block: YAML also breaks
/// lines at U+0085, U+2028 and U+2029), one final newline, no trailing
/// blanks, and a first line that does not start with a space (which would
/// need an indentation indicator).
fn literal_ok(s: &str) -> bool {
    s.ends_with('\n')
        && !s.ends_with("\n\n")
        && !s.starts_with([' ', '\n'])
        && s.bytes().all(|b| matches!(b, b' '..=b'~' | b'\n'))
        && !s.lines().any(|l| l.ends_with(' '))
}

/// gzip with the artifacts' fixed header (mtime 0, no name) from the
/// pinned backend.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc =
        crate::artifact::archive::gzip_builder().write(Vec::new(), flate2::Compression::best());
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(bytes);
    enc.finish().unwrap_or_default()
}

impl CloudConfig {
    pub fn render(&self, gz_files: bool) -> String {
        let mut y = String::from("#cloud-config\n");
        for line in &self.header {
            y.push_str(&format!("# {line}\n"));
        }
        if let Some(h) = &self.hostname {
            match h.split_once('.') {
                Some((short, _)) => {
                    y.push_str(&format!("hostname: {}\nfqdn: {}\n", q(short), q(h)));
                }
                None => y.push_str(&format!("hostname: {}\n", q(h))),
            }
            y.push_str("preserve_hostname: false\n");
        }
        y.push_str("ssh_pwauth: false\ndisable_root: true\n");
        // With admin keys, no `default` user: the image's default account
        // (passwordless sudo) is not created. Without, the image's cloud.cfg
        // decides (cloud-init's schema refuses an empty `users`).
        if let Some(a) = &self.admin {
            {
                y.push_str(&format!("groups: [{}]\nusers:\n", q(&a.group)));
                y.push_str(&format!("  - name: {}\n", q(&a.user)));
                y.push_str(&format!("    groups: {}\n", q(&a.group)));
                y.push_str("    shell: \"/bin/bash\"\n");
                match &a.password_hash {
                    // For sudo only: sshd takes keys alone.
                    Some(h) => y.push_str(&format!(
                        "    lock_passwd: false\n    hashed_passwd: {}\n",
                        q(h)
                    )),
                    None => y.push_str("    lock_passwd: true\n"),
                }
                y.push_str(&format!(
                    "    ssh_authorized_keys: {}\n",
                    list(&a.ssh_authorized_keys)
                ));
            }
        }
        if !self.packages.is_empty() {
            y.push_str(&format!("packages: {}\n", list(&self.packages)));
        }
        y.push_str("write_files:\n");
        for f in &self.files {
            y.push_str(&format!("  - path: {}\n", q(&f.path)));
            y.push_str("    owner: \"root:root\"\n");
            y.push_str(&format!("    permissions: \"{:04o}\"\n", f.mode));
            if gz_files {
                let b64 =
                    base64::engine::general_purpose::STANDARD.encode(gzip(f.content.as_bytes()));
                y.push_str(&format!(
                    "    encoding: \"gz+b64\"\n    content: {}\n",
                    q(&b64)
                ));
            } else if literal_ok(&f.content) {
                y.push_str("    content: |\n");
                for line in f.content.lines() {
                    if line.is_empty() {
                        y.push('\n');
                    } else {
                        y.push_str(&format!("      {line}\n"));
                    }
                }
            } else {
                y.push_str(&format!("    content: {}\n", q(&f.content)));
            }
        }
        y.push_str(&format!("runcmd:\n  - {}\n", list(&self.runcmd)));
        y
    }

    /// The bytes to deliver to `provider` and their form, or the budget error.
    pub fn deliver(&self, provider: Provider, host: &str) -> Result<(Vec<u8>, Form)> {
        let text = self.render(false).into_bytes();
        let Some(budget) = provider.budget() else {
            return Ok((text, Form::Text));
        };
        if budget.size_of(text.len()) <= budget.limit {
            return Ok((text, Form::Text));
        }
        let (bytes, form) = if budget.binary {
            (gzip(&text), Form::Gzip)
        } else {
            (self.render(true).into_bytes(), Form::GzB64Files)
        };
        check(provider, host, &bytes, form)?;
        Ok((bytes, form))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Provider; 7] = [
        Provider::Ec2,
        Provider::Gcp,
        Provider::Azure,
        Provider::Hetzner,
        Provider::Digitalocean,
        Provider::Openstack,
        Provider::Nocloud,
    ];

    /// The largest delivered size each provider takes: exactly at the limit
    /// passes, one byte more fails with the documented message. OpenStack
    /// counts base64 (whole quads): 49,149 raw bytes are 65,532 encoded, the
    /// most under 65,535; 49,150 are 65,536.
    #[test]
    fn every_provider_at_its_size_boundary() {
        for p in ALL {
            let Some(b) = p.budget() else {
                assert!(check(p, "h", &vec![b'x'; 10 << 20], Form::Text).is_ok());
                continue;
            };
            let at = match b.measure {
                Measure::Raw => b.limit,
                Measure::Base64 => b.limit / 4 * 3,
            };
            assert!(b.size_of(at) <= b.limit && b.size_of(at + 1) > b.limit);
            check(p, "h", &vec![b'x'; at], Form::Text)
                .unwrap_or_else(|e| panic!("{}: at the limit: {e}", p.name()));
            let e = check(p, "h", &vec![b'x'; at + 1], Form::Gzip).expect_err("one byte over");
            let m = e.to_string();
            assert_eq!(e.exit_code(), 2);
            let size = b.size_of(at + 1);
            assert!(
                m.starts_with(&format!(
                    "--provider {}: user-data for host h is {size} ",
                    p.name()
                )) && m.contains(&format!("over {}'s limit of {} ", p.name(), b.limit))
                    && m.contains("never truncated")
                    && m.contains("--provider nocloud"),
                "{m}"
            );
        }
    }

    #[test]
    fn documented_limits() {
        let limit = |p: Provider| p.budget().map(|b| (b.limit, b.measure, b.binary));
        assert_eq!(limit(Provider::Ec2), Some((16_384, Measure::Raw, true)));
        assert_eq!(limit(Provider::Azure), Some((65_535, Measure::Raw, true)));
        assert_eq!(
            limit(Provider::Openstack),
            Some((65_535, Measure::Base64, true))
        );
        assert_eq!(
            limit(Provider::Hetzner),
            Some((32_768, Measure::Raw, false))
        );
        assert_eq!(
            limit(Provider::Digitalocean),
            Some((65_536, Measure::Raw, false))
        );
        assert_eq!(limit(Provider::Gcp), Some((262_144, Measure::Raw, false)));
        assert_eq!(limit(Provider::Nocloud), None);
    }

    fn config(content: String) -> CloudConfig {
        CloudConfig {
            header: vec!["test".into()],
            hostname: Some("a.example".into()),
            admin: None,
            packages: vec![],
            files: vec![File {
                path: "/etc/x".into(),
                mode: 0o644,
                content,
            }],
            runcmd: vec!["/bin/true".into()],
        }
    }

    #[test]
    fn falls_back_to_gzip_or_gz_b64_and_is_deterministic() {
        let big = "line of host values that compresses well\n".repeat(1000);
        let c = config(big);
        let (ec2, form) = c.deliver(Provider::Ec2, "a").expect("fits gzipped");
        assert_eq!(form, Form::Gzip);
        assert_eq!(&ec2[..3], &[0x1f, 0x8b, 8]);
        let (hz, form) = c.deliver(Provider::Hetzner, "a").expect("fits as gz+b64");
        assert_eq!(form, Form::GzB64Files);
        assert!(std::str::from_utf8(&hz).expect("text").contains("gz+b64"));
        assert_eq!(c.deliver(Provider::Ec2, "a").expect("again").0, ec2);
        let (plain, form) = c.deliver(Provider::Gcp, "a").expect("fits plain");
        assert_eq!(form, Form::Text);
        assert!(plain.starts_with(b"#cloud-config\n"));
    }

    #[test]
    fn quoting_escapes_all_but_printable_ascii() {
        assert_eq!(q("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(
            q("x\u{2028}y\u{85}\n\u{1f600}"),
            r#""x\u2028y\u0085\u000a\U0001f600""#
        );
    }

    #[test]
    fn literal_blocks_only_where_exact() {
        for (content, literal) in [
            ("a\nb\n", true),
            ("a\n\nb\n", true),
            ("a", false),
            ("a\n\n", false),
            (" lead\n", false),
            ("trail \n", false),
            ("bell\u{7}\n", false),
            ("tab\there\n", false),
            ("x\u{2028}bootcmd: [[sh]]\n", false),
            ("x\u{85}y\n", false),
        ] {
            let y = config(content.into()).render(false);
            assert_eq!(y.contains("content: |"), literal, "{content:?}");
        }
    }
}
