//! Trust: the keyring of trusted keys (`keyring`), minisign-compatible keys
//! and signatures (`sign`), the one way to a verified artifact (`verify`),
//! and the digests everything is bound by (`digest`).

pub mod keyring;
pub mod verify;

pub mod sign;

pub mod digest;
