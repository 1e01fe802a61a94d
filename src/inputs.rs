//! What comes from outside the repo: artifacts given to `apply`, `verify`,
//! `inspect` and `diff` as URLs (`fetch`).

pub mod fetch;
