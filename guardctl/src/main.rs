//! guardctl: the command-line client of guard's fwd (grants, audit) and dnsd (cache, upstreams).
#![forbid(unsafe_code)]

mod args;
mod cli;
mod client;
mod cmd;
mod format;
mod output;
mod table;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Usage errors exit 2 here, through clap, before anything is contacted.
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            report(&anyhow::Error::new(err).context("cannot start the async runtime"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cmd::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            report(&err);
            ExitCode::FAILURE
        }
    }
}

/// Prints the error and every cause under it on stderr.
fn report(err: &anyhow::Error) {
    eprintln!("guardctl: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}
