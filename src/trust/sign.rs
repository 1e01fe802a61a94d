//! Keys and signatures in minisign's formats, so stock `minisign` verifies
//! what we sign and signs with keys we read. Signatures are the prehashed
//! `ED` kind: Ed25519 over BLAKE2b-512 of the file, plus a global signature
//! over the signature and the trusted comment. Secret material never appears
//! in an error message or a `Debug` output.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use blake2::Digest as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

use crate::error::{Error, Result};

const ALG_ED: &[u8; 2] = b"Ed";
const ALG_PREHASHED: &[u8; 2] = b"ED";
const KDF_SCRYPT: &[u8; 2] = b"Sc";
const KDF_NONE: &[u8; 2] = b"\0\0";
const CHK_BLAKE2: &[u8; 2] = b"B2";
const UNTRUSTED: &str = "untrusted comment: ";
const TRUSTED: &str = "trusted comment: ";
/// minisign's defaults for new encrypted keys (libsodium's "sensitive" limits).
const OPSLIMIT: u64 = 33_554_432;
const MEMLIMIT: u64 = 1_073_741_824;
/// Refuse keys whose KDF would need more memory than this.
const MEMLIMIT_MAX: u64 = 4 * 1_073_741_824;

/// The BLAKE2b-512 prehash that `ED` signatures sign.
pub type Prehash = [u8; 64];

/// A streaming BLAKE2b-512 hasher for the prehash.
#[derive(Default)]
pub struct Prehasher(blake2::Blake2b512);

impl Prehasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Prehash {
        self.0.finalize().into()
    }
}

/// Formats a key id the way minisign prints it (little-endian, upper hex,
/// no zero padding).
fn key_id_text(id: &[u8; 8]) -> String {
    format!("{:X}", u64::from_le_bytes(*id))
}

fn decode_line(line: &str, what: &str) -> Result<Vec<u8>, String> {
    B64.decode(line.as_bytes())
        .map_err(|_| format!("{what} is not valid base64"))
}

/// A minisign public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key_id: [u8; 8],
    key: VerifyingKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

impl PublicKey {
    /// The key id as minisign prints it.
    pub fn key_id(&self) -> String {
        key_id_text(&self.key_id)
    }

    /// Parses a public-key file (comment line + base64 line) or a bare base64 key.
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default();
        let b64 = if first.starts_with(UNTRUSTED) {
            lines.next().unwrap_or_default()
        } else {
            first
        };
        let raw = decode_line(b64.trim_end(), "the public key")?;
        if raw.len() != 42 || &raw[..2] != ALG_ED {
            return Err("not a minisign Ed25519 public key".to_owned());
        }
        let key_id: [u8; 8] = raw[2..10].try_into().expect("slice of 8");
        let pk: [u8; 32] = raw[10..42].try_into().expect("slice of 32");
        let key = VerifyingKey::from_bytes(&pk)
            .map_err(|_| "the public key is not a valid Ed25519 point".to_owned())?;
        Ok(PublicKey { key_id, key })
    }

    pub fn load(path: &Path) -> Result<PublicKey> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path, "reading public key"))?;
        PublicKey::parse(&text)
            .map_err(|m| Error::input(path, format!("{m}; give a minisign .pub file")))
    }

    /// The public-key file, as `minisign -G` writes it.
    pub fn to_file(&self) -> String {
        let mut raw = Vec::with_capacity(42);
        raw.extend_from_slice(ALG_ED);
        raw.extend_from_slice(&self.key_id);
        raw.extend_from_slice(self.key.as_bytes());
        format!(
            "{UNTRUSTED}minisign public key {}\n{}\n",
            self.key_id(),
            B64.encode(raw)
        )
    }
}

/// A minisign secret key, decrypted.
pub struct SecretKey {
    key_id: [u8; 8],
    signing: SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, redacted)", key_id_text(&self.key_id))
    }
}

/// libsodium's mapping of (opslimit, memlimit) to scrypt's (log2 N, r, p).
fn scrypt_params(opslimit: u64, memlimit: u64) -> (u8, u32, u32) {
    let opslimit = opslimit.max(32_768);
    let r: u64 = 8;
    let (max_n, p) = if opslimit < memlimit / 32 {
        (opslimit / (r * 4), 1)
    } else {
        (memlimit / (r * 128), 0)
    };
    let mut log_n: u8 = 1;
    while log_n < 63 && (1u64 << log_n) <= max_n / 2 {
        log_n += 1;
    }
    let p = if p == 1 {
        1
    } else {
        let max_rp = ((opslimit / 4) / (1u64 << log_n)).min(0x3fff_ffff);
        (max_rp / r) as u32
    };
    (log_n, r as u32, p)
}

fn scrypt_stream(
    password: &[u8],
    salt: &[u8],
    opslimit: u64,
    memlimit: u64,
) -> Result<[u8; 104], String> {
    if memlimit > MEMLIMIT_MAX {
        return Err("the key's scrypt memory limit is too large".to_owned());
    }
    let (log_n, r, p) = scrypt_params(opslimit, memlimit);
    let params = scrypt::Params::new(log_n, r, p.max(1), scrypt::Params::RECOMMENDED_LEN)
        .map_err(|e| format!("bad scrypt parameters: {e}"))?;
    let mut out = [0u8; 104];
    scrypt::scrypt(password, salt, &params, &mut out).map_err(|e| format!("scrypt failed: {e}"))?;
    Ok(out)
}

fn checksum(key_id: &[u8; 8], sk: &[u8; 64]) -> [u8; 32] {
    let mut h = blake2::Blake2b::<blake2::digest::consts::U32>::new();
    h.update(ALG_ED);
    h.update(key_id);
    h.update(sk);
    h.finalize().into()
}

impl SecretKey {
    /// A new random key.
    pub fn generate() -> Result<SecretKey> {
        let mut seed = [0u8; 32];
        let mut key_id = [0u8; 8];
        let rng = |e: getrandom::Error| Error::usage("random number generator", e);
        getrandom::getrandom(&mut seed).map_err(rng)?;
        getrandom::getrandom(&mut key_id).map_err(rng)?;
        Ok(SecretKey {
            key_id,
            signing: SigningKey::from_bytes(&seed),
        })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            key_id: self.key_id,
            key: self.signing.verifying_key(),
        }
    }

    /// Parses a minisign secret-key file; `password` is needed if it is encrypted.
    pub fn parse(text: &str, password: Option<&[u8]>) -> Result<SecretKey, String> {
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default();
        if !first.starts_with(UNTRUSTED) {
            return Err("not a minisign secret key (no untrusted comment line)".to_owned());
        }
        let raw = decode_line(
            lines.next().unwrap_or_default().trim_end(),
            "the secret key",
        )?;
        if raw.len() != 158 || &raw[..2] != ALG_ED || &raw[4..6] != CHK_BLAKE2 {
            return Err("not a minisign Ed25519 secret key".to_owned());
        }
        let kdf: [u8; 2] = raw[2..4].try_into().expect("slice of 2");
        let salt = &raw[6..38];
        let opslimit = u64::from_le_bytes(raw[38..46].try_into().expect("slice of 8"));
        let memlimit = u64::from_le_bytes(raw[46..54].try_into().expect("slice of 8"));
        let mut keynum: [u8; 104] = raw[54..158].try_into().expect("slice of 104");
        let encrypted = match &kdf {
            k if k == KDF_SCRYPT => true,
            k if k == KDF_NONE => false,
            _ => return Err("unsupported key derivation function".to_owned()),
        };
        if encrypted {
            let Some(password) = password else {
                return Err(
                    "the key is encrypted: give its password with --password-file".to_owned(),
                );
            };
            let stream = scrypt_stream(password, salt, opslimit, memlimit)?;
            keynum.iter_mut().zip(stream).for_each(|(b, s)| *b ^= s);
        }
        let key_id: [u8; 8] = keynum[..8].try_into().expect("slice of 8");
        let sk: [u8; 64] = keynum[8..72].try_into().expect("slice of 64");
        let chk = &keynum[72..104];
        // Stock `minisign -G -W` leaves the checksum of unencrypted keys zero.
        let unchecked = !encrypted && chk.iter().all(|&b| b == 0);
        if !unchecked && chk != checksum(&key_id, &sk) {
            return Err(if encrypted {
                "wrong password for this key".to_owned()
            } else {
                "the key's checksum does not match: the file is damaged".to_owned()
            });
        }
        let seed: [u8; 32] = sk[..32].try_into().expect("slice of 32");
        let signing = SigningKey::from_bytes(&seed);
        if signing.verifying_key().as_bytes() != &sk[32..] {
            return Err(
                "the key's public half does not match its seed: the file is damaged".to_owned(),
            );
        }
        Ok(SecretKey { key_id, signing })
    }

    /// Loads the key at `path`, decrypting with the password in `password_file`.
    pub fn load(path: &Path, password_file: Option<&Path>) -> Result<SecretKey> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path, "reading secret key"))?;
        let password = password_file.map(read_password).transpose()?;
        SecretKey::parse(&text, password.as_deref()).map_err(|m| Error::input(path, m))
    }

    /// The secret-key file; encrypted as `minisign -G` does when a password is given.
    pub fn to_file(&self, password: Option<&[u8]>) -> Result<String> {
        let mut sk = [0u8; 64];
        sk[..32].copy_from_slice(self.signing.as_bytes());
        sk[32..].copy_from_slice(self.signing.verifying_key().as_bytes());
        let mut keynum = [0u8; 104];
        keynum[..8].copy_from_slice(&self.key_id);
        keynum[8..72].copy_from_slice(&sk);
        keynum[72..].copy_from_slice(&checksum(&self.key_id, &sk));
        let mut raw = Vec::with_capacity(158);
        raw.extend_from_slice(ALG_ED);
        match password {
            Some(password) => {
                let mut salt = [0u8; 32];
                getrandom::getrandom(&mut salt)
                    .map_err(|e| Error::usage("random number generator", e))?;
                let stream = scrypt_stream(password, &salt, OPSLIMIT, MEMLIMIT)
                    .map_err(|m| Error::usage("scrypt", m))?;
                keynum.iter_mut().zip(stream).for_each(|(b, s)| *b ^= s);
                raw.extend_from_slice(KDF_SCRYPT);
                raw.extend_from_slice(CHK_BLAKE2);
                raw.extend_from_slice(&salt);
                raw.extend_from_slice(&OPSLIMIT.to_le_bytes());
                raw.extend_from_slice(&MEMLIMIT.to_le_bytes());
            }
            None => {
                raw.extend_from_slice(KDF_NONE);
                raw.extend_from_slice(CHK_BLAKE2);
                raw.extend_from_slice(&[0u8; 48]);
            }
        }
        raw.extend_from_slice(&keynum);
        let comment = if password.is_some() {
            "minisign encrypted secret key"
        } else {
            "minisign secret key (unencrypted)"
        };
        Ok(format!("{UNTRUSTED}{comment}\n{}\n", B64.encode(raw)))
    }

    /// A signature file for a file whose BLAKE2b-512 is `prehash`.
    pub fn sign(&self, prehash: &Prehash, trusted_comment: &str) -> String {
        assert!(
            !trusted_comment.contains(['\n', '\r']),
            "trusted comments are one line"
        );
        let sig = self.signing.sign(prehash).to_bytes();
        let mut sig_struct = Vec::with_capacity(74);
        sig_struct.extend_from_slice(ALG_PREHASHED);
        sig_struct.extend_from_slice(&self.key_id);
        sig_struct.extend_from_slice(&sig);
        let mut global = sig.to_vec();
        global.extend_from_slice(trusted_comment.as_bytes());
        let global_sig = self.signing.sign(&global).to_bytes();
        format!(
            "{UNTRUSTED}signature from infrakit secret key {}\n{}\n{TRUSTED}{trusted_comment}\n{}\n",
            key_id_text(&self.key_id),
            B64.encode(sig_struct),
            B64.encode(global_sig)
        )
    }
}

/// Reads a password file: its bytes less one trailing newline.
pub fn read_password(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = std::fs::read(path).map_err(Error::io(path, "reading password file"))?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err(Error::input(path, "password file is empty"));
    }
    Ok(bytes)
}

/// A parsed signature file.
#[derive(Debug, Clone)]
pub struct Signature {
    key_id: [u8; 8],
    sig: [u8; 64],
    trusted_comment: String,
    global_sig: [u8; 64],
}

impl Signature {
    /// Parses a minisign signature file strictly: four lines, each newline
    /// terminated (the last one may lack it), canonical base64, prehashed `ED`.
    pub fn parse(bytes: &[u8]) -> Result<Signature, String> {
        let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
        let [untrusted, sig_line, trusted, global_line] = lines[..] else {
            return Err(format!("signature file has {} lines, want 4", lines.len()));
        };
        // Line 1 is unsigned: like minisign, only its prefix matters.
        if !untrusted.starts_with(UNTRUSTED.as_bytes()) {
            return Err("line 1 does not start with \"untrusted comment: \"".to_owned());
        }
        fn utf8(line: &[u8], n: usize) -> Result<&str, String> {
            std::str::from_utf8(line)
                .map_err(|_| format!("line {n} of the signature file is not UTF-8"))
        }
        let (sig_line, trusted, global_line) =
            (utf8(sig_line, 2)?, utf8(trusted, 3)?, utf8(global_line, 4)?);
        let Some(trusted_comment) = trusted.strip_prefix(TRUSTED) else {
            return Err("line 3 does not start with \"trusted comment: \"".to_owned());
        };
        if trusted_comment.contains('\r') {
            return Err("the trusted comment contains a carriage return".to_owned());
        }
        let sig_struct = decode_line(sig_line, "the signature line")?;
        if sig_struct.len() != 74 {
            return Err("the signature line has the wrong length".to_owned());
        }
        match &sig_struct[..2] {
            a if a == ALG_PREHASHED => {}
            a if a == ALG_ED => {
                return Err(
                    "legacy (non-prehashed) signature; sign with infrakit or minisign -H"
                        .to_owned(),
                );
            }
            _ => return Err("unsupported signature algorithm".to_owned()),
        }
        let global = decode_line(global_line, "the trusted comment signature")?;
        let global_sig: [u8; 64] = global
            .try_into()
            .map_err(|_| "the trusted comment signature has the wrong length".to_owned())?;
        Ok(Signature {
            key_id: sig_struct[2..10].try_into().expect("slice of 8"),
            sig: sig_struct[10..74].try_into().expect("slice of 64"),
            trusted_comment: trusted_comment.to_owned(),
            global_sig,
        })
    }

    pub fn key_id(&self) -> String {
        key_id_text(&self.key_id)
    }

    /// The trusted comment; only meaningful after `verify` succeeded.
    pub fn trusted_comment(&self) -> &str {
        &self.trusted_comment
    }

    /// Checks the signature of a file with `prehash` by one of `keys`, and the
    /// trusted comment's signature; returns the key that signed. The key is
    /// picked by its id, so `keys` must not hold two keys with one id
    /// (`keyring::Keyring` refuses that).
    pub fn verify<'k>(
        &self,
        keys: &'k [PublicKey],
        prehash: &Prehash,
    ) -> Result<&'k PublicKey, String> {
        let key = self.signer(keys)?;
        let sig = ed25519_dalek::Signature::from_bytes(&self.sig);
        key.key.verify_strict(prehash, &sig).map_err(|_| {
            "the signature does not match the artifact: one of them was altered; fetch both again"
                .to_owned()
        })?;
        self.verify_comment(keys)
    }

    /// Checks only the trusted comment's signature (over the file's
    /// signature and the comment) by one of `keys`: what vouches for the
    /// comment, and through it for a manifest, when the file itself is gone.
    pub fn verify_comment<'k>(&self, keys: &'k [PublicKey]) -> Result<&'k PublicKey, String> {
        let key = self.signer(keys)?;
        let mut global = self.sig.to_vec();
        global.extend_from_slice(self.trusted_comment.as_bytes());
        let global_sig = ed25519_dalek::Signature::from_bytes(&self.global_sig);
        key.key
            .verify_strict(&global, &global_sig)
            .map_err(|_| {
                "the trusted comment's signature does not match: the .minisig was altered; fetch it again"
                    .to_owned()
            })?;
        Ok(key)
    }

    /// The key of `keys` with this signature's key id.
    fn signer<'k>(&self, keys: &'k [PublicKey]) -> Result<&'k PublicKey, String> {
        keys.iter().find(|k| k.key_id == self.key_id).ok_or_else(|| {
            let known: Vec<String> = keys.iter().map(PublicKey::key_id).collect();
            format!(
                "signed by key {}, which is not a trusted key ({}); add its .pub to the keyring only if you trust it",
                self.key_id(),
                known.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prehash(data: &[u8]) -> Prehash {
        let mut h = Prehasher::default();
        h.update(data);
        h.finish()
    }

    #[test]
    fn key_id_is_printed_like_minisign_without_zero_padding() {
        // Regression: a key id whose top nibble is zero printed as 0ABC…
        // where minisign prints ABC…, so ids did not match between tools.
        let id = 0x0123_4567_89ab_cdefu64.to_le_bytes();
        assert_eq!(key_id_text(&id), "123456789ABCDEF");
    }

    #[test]
    fn libsodium_parameter_mapping() {
        // minisign's defaults: N = 2^20, r = 8, p = 1.
        assert_eq!(scrypt_params(OPSLIMIT, MEMLIMIT), (20, 8, 1));
        // libsodium's interactive limits.
        assert_eq!(scrypt_params(524_288, 16_777_216), (14, 8, 1));
    }

    #[test]
    fn sign_verify_round_trip_and_refusals() {
        let sk = SecretKey::generate().unwrap();
        let pk = PublicKey::parse(&sk.public().to_file()).unwrap();
        let text = sk.sign(&prehash(b"data"), "name:x version:1");
        let sig = Signature::parse(text.as_bytes()).unwrap();
        assert_eq!(
            sig.verify(std::slice::from_ref(&pk), &prehash(b"data"))
                .unwrap(),
            &pk
        );
        assert!(
            sig.verify(std::slice::from_ref(&pk), &prehash(b"datb"))
                .is_err()
        );
        let other = SecretKey::generate().unwrap().public();
        assert!(sig.verify(&[other], &prehash(b"data")).is_err());
        let edited = text.replace("version:1", "version:2");
        let sig = Signature::parse(edited.as_bytes()).unwrap();
        assert!(sig.verify(&[pk], &prehash(b"data")).is_err());
    }

    #[test]
    fn unencrypted_secret_key_round_trip_and_redacted_debug() {
        let sk = SecretKey::generate().unwrap();
        let file = sk.to_file(None).unwrap();
        let back = SecretKey::parse(&file, None).unwrap();
        assert_eq!(back.public(), sk.public());
        assert!(!format!("{back:?}").contains(&crate::trust::digest::hex(sk.signing.as_bytes())));
    }

    #[test]
    fn strict_signature_parsing() {
        let sk = SecretKey::generate().unwrap();
        let text = sk.sign(&prehash(b"x"), "c");
        assert!(Signature::parse(text.trim_end().as_bytes()).is_ok());
        assert!(Signature::parse(format!("{text}\n").as_bytes()).is_err());
        assert!(Signature::parse(text.replace('\n', "\r\n").as_bytes()).is_err());
        assert!(Signature::parse(text.replacen("RU", "RW", 1).as_bytes()).is_err());
    }
}
