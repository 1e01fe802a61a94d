//! The `infrakit` binary: parse, run, map the error to the exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = infrakit::cli::Cli::parse();
    match infrakit::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("infrakit: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
