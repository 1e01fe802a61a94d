//! The one `Error` type: it owns the wording of every message and maps each
//! kind to the exit-code contract (1 a check failed, 2 usage or I/O error)
//! and to the `kind` that `--json` reports. It must never format secrets:
//! messages carry paths and reasons only.

use std::fmt;
use std::path::{Path, PathBuf};

/// Everything that can go wrong, sorted by what the caller does about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Bad input: a profile, overlay, key or flag the user must fix.
    #[error("{location}: {message}")]
    Input { location: String, message: String },
    /// A check failed: the artifact, signature or manifest is not what it claims.
    #[error("verification failed: {0}")]
    Check(String),
    /// Lint found problems in what would be built.
    #[error("lint: {0}")]
    Lint(String),
    /// A host operation refused: a downgrade, a conflict, nothing to roll back.
    #[error("refused: {0}")]
    Refused(String),
    /// A host is not what its release says (drift, missing secrets, an
    /// interrupted activation).
    #[error("{0}")]
    Unhealthy(String),
    /// A check could not be made (unreadable state or files): not a
    /// failure, and never a success.
    #[error("could not check: {0}")]
    Unchecked(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The process exit code for this error: 1 for a failed check, 2 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Check(_) | Error::Lint(_) | Error::Refused(_) | Error::Unhealthy(_) => 1,
            Error::Io { .. } | Error::Input { .. } | Error::Unchecked(_) => 2,
        }
    }

    /// The name `--json` gives this kind of error (docs/json.md).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Input { .. } => "input",
            Error::Check(_) => "check",
            Error::Lint(_) => "lint",
            Error::Refused(_) => "refused",
            Error::Unhealthy(_) => "unhealthy",
            Error::Unchecked(_) => "unchecked",
        }
    }

    /// The same error with `from` replaced by `to` wherever it names a file:
    /// a download's temporary directory becomes the URL it came from, so a
    /// message names what the user gave, never a temporary file.
    pub fn replace_path_prefix(self, from: &str, to: &str) -> Error {
        let swap = |s: String| s.replace(from, to);
        match self {
            Error::Io {
                path,
                action,
                source,
            } => Error::Io {
                path: PathBuf::from(swap(path.display().to_string())),
                action,
                source,
            },
            Error::Input { location, message } => Error::Input {
                location: swap(location),
                message: swap(message),
            },
            Error::Check(m) => Error::Check(swap(m)),
            Error::Lint(m) => Error::Lint(swap(m)),
            Error::Refused(m) => Error::Refused(swap(m)),
            Error::Unhealthy(m) => Error::Unhealthy(swap(m)),
            Error::Unchecked(m) => Error::Unchecked(swap(m)),
        }
    }

    /// Bad input in `path` as a whole.
    pub fn input(path: &Path, message: impl fmt::Display) -> Error {
        Error::Input {
            location: path.display().to_string(),
            message: message.to_string(),
        }
    }

    /// Bad input at a line and column of `path` (both 1-based).
    pub fn input_at(path: &Path, line: usize, column: usize, message: impl fmt::Display) -> Error {
        Error::Input {
            location: format!("{}:{line}:{column}", path.display()),
            message: message.to_string(),
        }
    }

    /// Bad input at a byte offset of `text`, the contents of `path`.
    pub fn input_at_offset(
        path: &Path,
        text: &str,
        offset: usize,
        message: impl fmt::Display,
    ) -> Error {
        let (line, column) = line_column(text, offset);
        Error::input_at(path, line, column, message)
    }

    /// Bad usage that belongs to no file: a flag or environment value.
    pub fn usage(what: impl fmt::Display, message: impl fmt::Display) -> Error {
        Error::Input {
            location: what.to_string(),
            message: message.to_string(),
        }
    }

    /// A closure that wraps an `io::Error` with the path and what was being done.
    pub fn io(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> Error + use<> {
        let path = path.to_path_buf();
        move |source| Error::Io {
            path,
            action,
            source,
        }
    }

    pub fn check(message: impl fmt::Display) -> Error {
        Error::Check(message.to_string())
    }
}

/// Parses strict TOML `text` read from `path`; errors carry `file:line:col`.
pub fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        Error::input_at_offset(path, text, offset, e.message().trim_end())
    })
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 8), (2, 3));
        assert_eq!(line_column(text, 999), (3, 1));
    }

    #[test]
    fn a_temporary_prefix_is_replaced_in_every_kind() {
        let io = Error::io(Path::new("/tmp/x1/p.tar.zst"), "opening artifact")(
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        let io = io.replace_path_prefix("/tmp/x1/", "http://h/r/");
        assert!(
            io.to_string()
                .starts_with("http://h/r/p.tar.zst: opening artifact")
        );
        let check = Error::check("/tmp/x1/p.tar.zst: bad; /tmp/x1/p.manifest.json too")
            .replace_path_prefix("/tmp/x1/", "http://h/");
        assert_eq!(
            check.to_string(),
            "verification failed: http://h/p.tar.zst: bad; http://h/p.manifest.json too"
        );
        assert_eq!(check.kind(), "check");
    }

    #[test]
    fn exit_codes_follow_the_contract() {
        assert_eq!(Error::check("x").exit_code(), 1);
        assert_eq!(Error::usage("--level", "x").exit_code(), 2);
    }
}
