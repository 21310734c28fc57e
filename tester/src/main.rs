//! `glockd-tester --host HOST:PORT`: parse the flags, run the checks, print, exit 0 only when
//! nothing failed.

use std::io::Write;
use std::process::ExitCode;

use glockd_tester::{run, Options};

fn main() -> ExitCode {
    let options = match Options::try_from_args(std::env::args_os()) {
        Ok(options) => options,
        Err(e) => {
            let _ = e.print();
            // clap's own status: 0 for --help/--version, 2 for a usage error.
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    // One thread is plenty: the checks run one after another and wait on the network.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("glockd-tester: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let json = options.json;
    let report = runtime.block_on(run(&options, |result| {
        // Lines go out as checks finish, so a slow server shows where it is slow.
        if !json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{result}");
            let _ = out.flush();
        }
    }));
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            eprintln!("glockd-tester: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!("{}", report.to_json());
    } else {
        println!("{}", report.summary());
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
