//! InfraKit: signed, byte-reproducible host artifacts for validator fleets.
//!
//! The modules read as the pipeline, top to bottom; imports run one way
//! (ARCHITECTURE.md has the whole order): `cli → commands → {emit, apply,
//! fetch, keyring, diff} → status → {verify, state, hooks} → {lint, archive,
//! manifest, sign} → prefetch → compose → {profile, overlay} → model →
//! confined → digest`. Only `cli` knows clap; nothing below `commands`
//! reads the environment, the clock or the terminal.

pub mod cli;
pub mod commands;
pub mod emit;
pub mod lint;
pub mod verify;

pub mod apply;
pub mod diff;
pub mod fetch;
pub mod hooks;
pub mod keyring;
pub mod state;
pub mod status;

pub mod archive;
pub mod manifest;
pub mod prefetch;
pub mod sign;

pub mod compose;
pub mod firewall;
pub mod generate;
pub mod overlay;
pub mod params;
pub mod profile;

pub mod confined;
pub mod digest;
pub mod error;
pub mod model;

pub use error::{Error, Result};
