//! `guardctl man`: the roff man page, for packaging.

use anyhow::Context as _;
use clap::{Args, CommandFactory};

use crate::cli::Cli;
use crate::output::print;

/// Arguments of `guardctl man` (none).
#[derive(Debug, Args)]
pub struct Man {}

impl Man {
    /// Prints guardctl(1) in roff on stdout.
    pub fn run(self) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut buf)
            .context("cannot render the man page")?;
        print(&String::from_utf8_lossy(&buf))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn man_page_renders() {
        let mut buf = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut buf)
            .unwrap();
        let page = String::from_utf8(buf).unwrap();
        assert!(page.contains(".TH guardctl"), "{page}");
        assert!(page.contains("GUARD_FWD_SOCKET"));
    }
}
