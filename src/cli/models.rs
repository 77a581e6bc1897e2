//! `sakuga models`: the demo model set.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::CommonArgs;

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Write the small deterministic demo models (real formats and key layouts).
    Demo {
        /// Target models dir (default: --models-dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// List the models found in the models dir.
    List,
}

pub fn run(common: &CommonArgs, command: &ModelsCommand) -> anyhow::Result<ExitCode> {
    let config = common.resolve()?;
    match command {
        ModelsCommand::Demo { dir } => {
            let dir = dir.clone().unwrap_or(config.models_dir);
            let written = sakuga_models::demo::write_demo_models(&dir)?;
            for path in &written {
                println!("{}", path.display());
            }
            println!(
                "wrote {} demo model file(s) under {}",
                written.len(),
                dir.display()
            );
        }
        ModelsCommand::List => {
            let store = sakuga_models::store::ModelStore::new(config.models_dir.clone());
            for folder in sakuga_models::store::ModelFolder::ALL {
                for name in store.list(folder) {
                    println!("{}/{name}", folder.dir_name());
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
