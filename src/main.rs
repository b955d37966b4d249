//! `callfleet`: one binary for every process of the fleet. `main` only bootstraps:
//! configuration → adapters → services → run until a signal.

mod cli;
mod livekit_cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // `callfleet livekit` documents finer exit codes for scripts.
            match e.downcast_ref::<livekit_cli::Failure>() {
                Some(failure) => std::process::ExitCode::from(failure.exit_code()),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}
