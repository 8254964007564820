//! `guardctl completions SHELL`: shell completion scripts, for packaging.

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use crate::cli::Cli;
use crate::output::print;

/// Arguments of `guardctl completions`.
#[derive(Debug, Args)]
pub struct Completions {
    /// The shell to generate completions for.
    #[arg(value_name = "SHELL")]
    shell: Shell,
}

impl Completions {
    /// Prints the completion script on stdout.
    pub fn run(self) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        clap_complete::generate(self.shell, &mut Cli::command(), "guardctl", &mut buf);
        print(&String::from_utf8_lossy(&buf))
    }
}
