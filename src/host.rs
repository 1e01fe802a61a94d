//! The host side: laying a verified release down on a root (`apply`,
//! `rollback`), checking a root against it (`status`), the state InfraKit
//! keeps there (`state`), what an activation asks of the running system
//! (`hooks`), and the directory handles every path goes through
//! (`confined`).

pub mod apply;
pub mod hooks;
pub mod state;
pub mod status;

pub mod confined;
