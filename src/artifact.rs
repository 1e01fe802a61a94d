//! The artifact: the build pipeline (`emit`), the checks every build runs
//! (`lint`), the deterministic archive (`archive`, fed ahead of time by
//! `prefetch`) and its canonical manifest (`manifest`, read a piece at a time by `pieces`).

pub mod emit;
pub mod lint;

pub mod archive;
pub mod manifest;
pub mod pieces;
pub mod prefetch;
