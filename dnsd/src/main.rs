//! dnsd's entry point: parse arguments, load and validate the config, bind sockets, run.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use dnsd::{Config, Sockets};
use tokio_util::sync::CancellationToken;

/// mimalloc: a miss allocates and frees a few dozen small objects (decoded records, the
/// answer, the cache entry); glibc's malloc was 15-20 % of dnsd's user time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// EX_USAGE from sysexits.h: bad arguments or configuration.
const EX_USAGE: u8 = 64;

/// guard's DNS forwarder: answers are released only after fwd has opened their addresses.
#[derive(Debug, Parser)]
#[command(name = "dnsd", version)]
struct Args {
    /// The TOML configuration file.
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        required_unless_present = "man"
    )]
    config: Option<PathBuf>,
    /// Print the man page (roff) and exit; used to build the package.
    #[arg(long, hide = true)]
    man: bool,
    /// Check the configuration, print every problem, and exit (0 valid, 64 invalid).
    #[arg(long)]
    validate: bool,
    /// Log format on stderr; the filter comes from RUST_LOG (default "info").
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EX_USAGE } else { 0 });
        }
    };
    if args.man {
        use clap::CommandFactory;
        return match clap_mangen::Man::new(Args::command())
            .section("8")
            .render(&mut std::io::stdout())
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dnsd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(config_path) = args.config.clone() else {
        eprintln!("dnsd: --config FILE is required");
        return ExitCode::from(EX_USAGE);
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dnsd: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if args.validate {
        println!("{}: configuration is valid", config_path.display());
        return ExitCode::SUCCESS;
    }
    // Before any thread exists: socket activation consumes the LISTEN_* variables.
    let sockets = match Sockets::open(&config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot open sockets");
            return ExitCode::FAILURE;
        }
    };
    let mut builder = match config.threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let result = runtime.block_on(async {
        dnsd::server::cancel_on_signals(&shutdown)?;
        dnsd::run(config, sockets, shutdown, Some(config_path)).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "dnsd failed");
            ExitCode::FAILURE
        }
    }
}
