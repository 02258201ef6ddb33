//! `socktrace generate`: shell completions (`clap_complete`) and roff man pages (`clap_mangen`), made
//! from the same clap definition the binary parses its arguments with, printed on stdout. The
//! Debian package ships what this prints (see `cargo xtask deb`).

use std::io::Write;

use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::Cli;

const BIN: &str = "socktrace";

/// What `generate` prints.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Target {
    /// Bash completion script (source it, or install as /usr/share/bash-completion/completions/socktrace).
    Bash,
    /// Zsh completion function (install as `_socktrace` in a directory of $fpath).
    Zsh,
    /// Fish completions (install as ~/.config/fish/completions/socktrace.fish).
    Fish,
    /// Man page in roff: socktrace(1), or socktrace-COMMAND(1) for one command's options.
    Man {
        /// The command whose page to print (e.g. watch).
        #[arg(value_name = "COMMAND", value_parser = parse_page)]
        command: Option<String>,
    },
}

/// Accepts the name of a subcommand (each has a man page of its own).
fn parse_page(s: &str) -> Result<String, String> {
    let cmd = Cli::command();
    if cmd.get_subcommands().any(|c| c.get_name() == s) {
        Ok(s.to_owned())
    } else {
        let names: Vec<&str> = cmd.get_subcommands().map(clap::Command::get_name).collect();
        Err(format!("{s:?} is not a socktrace command ({})", names.join(", ")))
    }
}

/// Writes the completion script or man page.
pub fn run(what: &Target, out: &mut impl Write) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let shell = match what {
        Target::Bash => Shell::Bash,
        Target::Zsh => Shell::Zsh,
        Target::Fish => Shell::Fish,
        Target::Man { command: None } => return Ok(man(cmd).render(out)?),
        Target::Man { command: Some(name) } => {
            // After build() a subcommand's display name is `socktrace-watch` (the page name, which
            // socktrace(1) lists, like git's pages) and its bin name `socktrace watch` (synopsis).
            cmd.build();
            let sub = cmd.find_subcommand(name).cloned().ok_or_else(|| anyhow::anyhow!("no command {name:?}"))?;
            return Ok(man(sub).render(out)?);
        }
    };
    clap_complete::generate(shell, &mut cmd, BIN, out);
    out.flush()?;
    Ok(())
}

/// Every page names the version and commit it documents (subcommands carry no version of their own).
fn man(cmd: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd).source(format!("{BIN} {}", env!("SOCKTRACE_VERSION"))).manual("socktrace manual")
}
