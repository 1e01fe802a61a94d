//! The one integration-test binary: it runs the real `infrakit` in temp
//! directories and judges the output with stock tools (ORACLES.md).

mod support;

mod adapters;
mod apply;
mod bad_input;
mod bootable_image;
mod bundle;
mod chain_profiles;
mod cli_surface;
mod container_firewall;
mod differential;
mod features;
mod first_boot;
mod hardening;
mod inputs;
mod oracles;
mod repro;
mod tamper;
mod vm;
