//! Parameters: typed values a profile sets (`[params]`) and overlays declare
//! (`[params.<name>]` with a type and a default). Resolution checks every
//! value against its declaration; a profile value nobody declares is an
//! error. Values reach templates and the firewall model; nothing here does I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, Result};

/// A parameter's declared type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ParamType {
    String,
    Integer,
    Bool,
    StringList,
    CidrList,
}

/// An overlay's declaration of a parameter it takes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamDecl {
    #[serde(rename = "type")]
    pub kind: ParamType,
    pub default: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub description: Option<String>,
}

/// A checked parameter value.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum Value {
    String(String),
    Integer(i64),
    Bool(bool),
    StringList(Vec<String>),
    CidrList(Vec<Cidr>),
}

/// An IPv4 or IPv6 network in CIDR notation, host bits zero.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("{s:?} is not an IP network like 192.0.2.0/24 or 2001:db8::/32")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has a bad prefix length (0 to {max})"))?,
        };
        let bits: u128 = match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let host_bits = u32::from(max - prefix);
        // All ones below the prefix; `checked_shr` covers /0 (a shift by 128).
        let host_mask = u128::MAX.checked_shr(128 - host_bits).unwrap_or(0);
        if bits & host_mask != 0 {
            return Err(format!(
                "{s:?} has host bits set below its /{prefix} prefix"
            ));
        }
        Ok(Cidr { addr, prefix })
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Checks `raw` against `kind`; the error says what was expected.
pub fn check(kind: ParamType, raw: &toml::Value) -> Result<Value, String> {
    let strings = |what: &str| -> Result<Vec<String>, String> {
        let arr = raw.as_array().ok_or_else(|| format!("expected {what}"))?;
        arr.iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("expected {what}"))
            })
            .collect()
    };
    Ok(match kind {
        ParamType::String => Value::String(raw.as_str().ok_or("expected a string")?.to_owned()),
        ParamType::Integer => Value::Integer(raw.as_integer().ok_or("expected an integer")?),
        ParamType::Bool => Value::Bool(raw.as_bool().ok_or("expected true or false")?),
        ParamType::StringList => Value::StringList(strings("a list of strings")?),
        ParamType::CidrList => {
            let list = strings("a list of CIDR strings")?;
            let mut cidrs = list
                .iter()
                .map(|s| Cidr::parse(s))
                .collect::<Result<Vec<_>, _>>()?;
            cidrs.sort();
            cidrs.dedup();
            Value::CidrList(cidrs)
        }
    })
}

/// The `[params]` a profile sets, with the text they came from for errors.
#[derive(Clone, Debug, Default)]
pub struct ProfileParams {
    pub values: BTreeMap<String, Spanned<toml::Value>>,
    pub path: std::path::PathBuf,
    pub text: String,
}

impl ProfileParams {
    fn error(&self, v: &Spanned<toml::Value>, msg: impl fmt::Display) -> Error {
        Error::input_at_offset(&self.path, &self.text, v.span().start, msg)
    }

    /// Values for one overlay's declarations: the profile's value, else the
    /// default; `decl_at` locates errors in the overlay's own file.
    pub fn resolve(
        &self,
        decls: &BTreeMap<String, ParamDecl>,
        decl_file: &Path,
        decl_text: &str,
    ) -> Result<BTreeMap<String, Value>> {
        let mut out = BTreeMap::new();
        for (name, decl) in decls {
            let value = match (self.values.get(name), &decl.default) {
                (Some(v), _) => check(decl.kind, v.get_ref())
                    .map_err(|m| self.error(v, format!("parameter {name}: {m}")))?,
                (None, Some(d)) => check(decl.kind, d.get_ref()).map_err(|m| {
                    Error::input_at_offset(
                        decl_file,
                        decl_text,
                        d.span().start,
                        format!("default of {name}: {m}"),
                    )
                })?,
                (None, None) => {
                    return Err(Error::input(
                        &self.path,
                        format!(
                            "parameter {name} has no default in {}: set it under [params]",
                            decl_file.display()
                        ),
                    ));
                }
            };
            out.insert(name.clone(), value);
        }
        Ok(out)
    }

    /// Fails on a profile parameter that no overlay declares.
    pub fn check_all_declared(&self, declared: &std::collections::BTreeSet<String>) -> Result<()> {
        for (name, v) in &self.values {
            if !declared.contains(name) {
                return Err(self.error(
                    v,
                    format!("parameter {name} is not declared by any overlay of this profile"),
                ));
            }
        }
        Ok(())
    }
}

/// Whether `name` is a valid parameter name: `[a-z][a-z0-9_-]*`.
pub fn valid_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Whether `when` (`"<param> == <value>"`, the value bare or quoted) holds
/// for these parameter values; the parameter must be a declared string
/// parameter.
pub fn when_holds(when: &str, values: &BTreeMap<String, Value>) -> Result<bool, String> {
    let Some((param, literal)) = when.split_once("==") else {
        return Err(format!(
            "when {when:?} must look like \"<param> == <value>\""
        ));
    };
    let param = param.trim();
    let literal = literal.trim();
    let literal = literal
        .strip_prefix('"')
        .and_then(|l| l.strip_suffix('"'))
        .or_else(|| {
            literal
                .strip_prefix('\'')
                .and_then(|l| l.strip_suffix('\''))
        })
        .unwrap_or(literal);
    match values.get(param) {
        Some(Value::String(s)) => Ok(s == literal),
        Some(_) => Err(format!("when: {param} is not a string parameter")),
        None => Err(format!(
            "when names {param:?}, which is not a parameter this layer declares under [params]"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_refuse() {
        assert_eq!(
            Cidr::parse("192.0.2.0/24").unwrap().to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            Cidr::parse("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            Cidr::parse("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert!(
            Cidr::parse("192.0.2.1/24")
                .unwrap_err()
                .contains("host bits")
        );
        assert!(Cidr::parse("192.0.2.0/33").unwrap_err().contains("prefix"));
        assert!(Cidr::parse("example.com").is_err());
        assert!(Cidr::parse("0.0.0.0/0").is_ok());
        // Regression: a /0 IPv6 network overflowed the host-bit mask.
        assert!(Cidr::parse("::/0").is_ok());
        assert!(
            Cidr::parse("2001:db8::1/0")
                .unwrap_err()
                .contains("host bits")
        );
        assert!(Cidr::parse("2001:db8::1/128").is_ok());
    }

    #[test]
    fn values_are_type_checked() {
        let v = |s: &str| -> toml::Value {
            toml::from_str::<toml::Table>(&format!("v = {s}")).unwrap()["v"].clone()
        };
        assert_eq!(check(ParamType::Integer, &v("22")), Ok(Value::Integer(22)));
        assert!(check(ParamType::Integer, &v("\"22\"")).is_err());
        assert!(check(ParamType::Bool, &v("1")).is_err());
        assert!(check(ParamType::StringList, &v("[\"a\", 1]")).is_err());
        assert!(check(ParamType::CidrList, &v("[\"10.0.0.0/33\"]")).is_err());
        assert_eq!(
            check(ParamType::String, &v("\"x\"")),
            Ok(Value::String("x".into()))
        );
    }
}
