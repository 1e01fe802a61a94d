//! InfraKit: signed, byte-reproducible host artifacts for validator fleets.
//!
//! The folders read as the pipeline, top to bottom, and imports run one way
//! (ARCHITECTURE.md has the whole map): `cli → commands → diff → host
//! (apply, status, state, hooks, confined) → inputs (fetch) → trust
//! (keyring, verify, sign, digest) → artifact (emit, lint, archive,
//! manifest, prefetch) → compose (profile, overlay, params, generate,
//! firewall) → model`. Only `cli` knows clap; nothing below `commands` reads
//! the environment, the clock or the terminal.

pub mod cli;
pub mod commands;
pub mod diff;

pub mod host;
pub mod inputs;
pub mod trust;

pub mod artifact;
pub mod compose;

pub mod error;
pub mod model;

pub use error::{Error, Result};
