//! InfraKit: signed, byte-reproducible host artifacts for validator fleets.
//!
//! The folders group the modules by stage (ARCHITECTURE.md has the map):
//! `host` (apply, status, state, hooks, confined), `inputs` (decl, lock,
//! cache, upstream, take, fetch),
//! `trust` (keyring, verify, sign, digest), `artifact` (emit, lint, archive,
//! manifest, prefetch), `compose` (profile, overlay, params, generate,
//! firewall). Imports run one way between modules: `cli → commands → {emit,
//! apply, fetch, inputs, keyring, diff} → status → {verify, state, hooks} → {lint,
//! archive, manifest, sign} → prefetch → compose → {profile, overlay} →
//! model → confined → digest`. Only `cli` knows clap; nothing below
//! `commands` reads the environment, the clock or the terminal.

pub mod bundle;
pub mod cli;
pub mod commands;
pub mod diff;

pub mod host;
pub mod image;
pub mod inputs;
pub mod trust;

pub mod artifact;
pub mod compose;

pub mod error;
pub mod model;
pub mod spool;

pub use error::{Error, Result};
