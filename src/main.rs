//! The `infrakit` binary: `cli::main` parses, runs and reports; its value
//! is the exit code (0 success, 1 a check failed, 2 usage, input or I/O).

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(infrakit::cli::main())
}
