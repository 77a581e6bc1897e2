//! Configuration: one plain-data struct read from `--config FILE` (TOML), then overridden
//! by `SAKUGA_*` environment variables and flags (clap merges those two).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use sakuga_scheduler::ExecutorConfig;
use sakuga_telemetry::{HistoryConfig, SignalsConfig};

/// Everything a `sakuga` process is configured with.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SakugaConfig {
    /// Models dir in ComfyUI's layout (`checkpoints/`, `loras/`, `upscale_models/`...).
    pub models_dir: PathBuf,
    /// Where LoadImage finds files (ComfyUI's `input/`).
    pub input_dir: PathBuf,
    /// Where SaveImage writes.
    pub out: PathBuf,
    /// Journal and server state.
    pub data_dir: PathBuf,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// RAM (CPU) or device memory budget of the model cache.
    pub model_cache_bytes: u64,
    pub executor: ExecutorConfig,
    pub signals: SignalsConfig,
    /// The job history in the data dir that `sakuga report` reads.
    pub history: HistoryConfig,
}

impl Default for SakugaConfig {
    fn default() -> Self {
        Self {
            models_dir: PathBuf::from(".sakuga/models"),
            input_dir: PathBuf::from(".sakuga/input"),
            out: PathBuf::from("out"),
            data_dir: PathBuf::from(".sakuga/data"),
            device: "cpu".into(),
            model_cache_bytes: 4 << 30,
            executor: ExecutorConfig::default(),
            signals: SignalsConfig::default(),
            history: HistoryConfig::default(),
        }
    }
}

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

impl SakugaConfig {
    /// Reads a TOML config file; a missing `path` gives the defaults.
    ///
    /// # Errors
    /// When the file cannot be read or does not match the schema (unknown keys included).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_files_keep_defaults_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sakuga.toml");
        std::fs::write(&path, "device = \"cuda:1\"\n[executor]\nworkers = 3\n").unwrap();
        let config = SakugaConfig::load(Some(&path)).unwrap();
        assert_eq!(config.device, "cuda:1");
        assert_eq!(config.executor.workers, 3);
        assert_eq!(config.out, PathBuf::from("out"));

        std::fs::write(&path, "devise = \"cpu\"\n").unwrap();
        let err = SakugaConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("devise"), "{err}");
    }
}
