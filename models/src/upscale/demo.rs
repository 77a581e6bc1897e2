//! The real upscaler of the demo model set: Real-ESRGAN's realesr-animevideov3 x4 in ncnn
//! format (1.25 MB, BSD-3-Clause), embedded in the binary so a fresh install has a working
//! anime upscaler without a download.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};
use crate::store::ModelFolder;

/// The ncnn model name the demo workflows load (an ncnn model is named by its `.param`).
pub const DEMO_UPSCALER: &str = "realesr-animevideov3-x4.param";

const FILES: &[(&str, &[u8])] = &[
    (
        "realesr-animevideov3-x4.param",
        include_bytes!("../../../assets/models/upscale_models/realesr-animevideov3-x4.param"),
    ),
    (
        "realesr-animevideov3-x4.bin",
        include_bytes!("../../../assets/models/upscale_models/realesr-animevideov3-x4.bin"),
    ),
    (
        "realesr-animevideov3-x4.LICENSE",
        include_bytes!("../../../assets/models/upscale_models/LICENSE"),
    ),
];

/// Writes the embedded upscaler into `upscale_models/` under the models root `dir`.
///
/// # Errors
/// [`ModelError::Io`] when a file cannot be written.
pub fn write_demo_upscaler(dir: &Path) -> Result<Vec<PathBuf>> {
    let folder = dir.join(ModelFolder::UpscaleModels.dir_name());
    std::fs::create_dir_all(&folder).map_err(|source| ModelError::Io {
        path: folder.clone(),
        source,
    })?;
    FILES
        .iter()
        .map(|(name, bytes)| {
            let path = folder.join(name);
            let tmp = path.with_extension("partial");
            std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|source| ModelError::Io {
                    path: path.clone(),
                    source,
                })?;
            Ok(path)
        })
        .collect()
}
