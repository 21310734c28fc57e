//! `loadgen`: see `loadgen --help` and the load generator's section of the README.

use std::process::ExitCode;

use clap::Parser;
use glockd_loadgen::{run, Args, Config};

fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.json;
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match run(config) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        match serde_json::to_string(&report) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("loadgen: cannot write the report as JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.table());
    }
    // Errors make the run fail, so scripts and CI notice them.
    if report.errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
