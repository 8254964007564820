//! fwd entry point: parse, validate, bind, drop privileges, reconcile, serve.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use fwd::config::{Config, ConfigError, Mode, Settings};
use fwd::{engine::Engine, listener, nft, privdrop, server, store};

/// guard's privileged half: owns the nftables table and commits DNS-derived grants.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (see fwd.example.toml); defaults apply without one.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override `socket`.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Override `database`.
    #[arg(long)]
    database: Option<PathBuf>,
    /// Override `mode`.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Check the configuration, print every problem, and exit (64 on error).
    #[arg(long)]
    validate: bool,
    /// Delete the nftables table (removes guard's filtering) and exit.
    #[arg(long)]
    remove_table: bool,
    /// Print the man page (roff) and exit; used to build the package.
    #[arg(long, hide = true)]
    man: bool,
    /// Log format: text or json (structured, for the journal).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
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
                eprintln!("fwd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    fwd::logging::init(&args.log_format);
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("(defaults)"));
    let settings = match load(&args) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("fwd: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if args.validate {
        println!("{}: configuration OK", path.display());
        return ExitCode::SUCCESS;
    }
    if args.remove_table {
        let exists =
            fwd::sys::Netlink::open().and_then(|mut nl| nl.table_exists(&settings.raw.table));
        let exists = match exists {
            Ok(e) => e,
            Err(e) => {
                eprintln!("fwd: {e}");
                return ExitCode::FAILURE;
            }
        };
        return match nft::remove_table(&settings.raw.table, exists) {
            Ok(true) => {
                println!("removed table inet {}", settings.raw.table);
                ExitCode::SUCCESS
            }
            Ok(false) => {
                println!("table inet {} does not exist", settings.raw.table);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fwd: {}", nft::error_text(&e));
                ExitCode::FAILURE
            }
        };
    }
    match start(settings, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("fwd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the config file (or the defaults) with the command-line overrides, validated.
fn load(args: &Args) -> Result<Settings, ConfigError> {
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("(defaults)"));
    let mut c = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::parse(&path, "")?,
    };
    c.socket = args.socket.clone().unwrap_or(c.socket);
    c.database = args.database.clone().unwrap_or(c.database);
    c.mode = args.mode.unwrap_or(c.mode);
    c.validate(&path)
}

fn start(settings: Arc<Settings>, args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let sock = listener::bind(&settings)?;
    let who = privdrop::drop_privileges(&settings.raw.user)?;
    tracing::info!(credentials = %who, "privileges dropped");
    let st = store::Store::open(&settings.raw.database)?;
    let (engine, report) = Engine::start(settings.clone(), st)?;
    tracing::info!(?report, "reconciled kernel sets with the state store");
    let reader = store::Reader::open(&settings.raw.database)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let token = tokio_util::sync::CancellationToken::new();
        let signals = fwd::listener::Signals::install()?;
        tokio::spawn(signals.serve(token.clone(), engine.clone(), move || load(&args)));
        server::run(engine.clone(), reader, sock, token).await?;
        // Record the commit mark so the next start need not re-add what is already in the kernel.
        tokio::task::spawn_blocking(move || engine.stop()).await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    tracing::info!("fwd stopped; the ruleset stays in place (fail closed)");
    Ok(())
}
